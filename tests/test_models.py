"""lab/models.py: every spec source resolves to a module, and every bad spec is one clear ModelError."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_safetensors

from lab.config import build_config
from lab.models import (
    ArmModule,
    ModelError,
    expected_identity,
    expected_preprocess,
    preflight,
    preprocess_for,
    resolve_model,
)

CFG = build_config({"epochs": 1})
X = torch.randn(2, 3, 32, 32)


def _reference(arch: str = "resnet10t", classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=classes).eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    with torch.inference_mode():
        return torch.allclose(a.eval()(X), b.eval()(X), atol=1e-5)


def test_timm_name_with_native_preprocessing() -> None:
    r = resolve_model("resnet10t", CFG, num_classes=7)
    assert r.source == "timm" and r.random_head and r.module.get_classifier().out_features == 7
    from timm.data import resolve_data_config

    expected = resolve_data_config(model=r.module)  # timm's own pretrained config, independently read
    assert r.native is not None and r.native.input_size == expected["input_size"][-1]
    assert (r.native.mean, r.native.interpolation, r.native.crop_pct) == (
        tuple(expected["mean"]),
        expected["interpolation"],
        expected["crop_pct"],
    )
    assert r.identity == "timm:resnet10t:pretrained=False:classes=7"


def test_unknown_timm_name_lists_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnet5O'.*did you mean resnet50"):
        resolve_model("resnet5O", CFG, 10)


def test_pretrained_without_network_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The same failure as no network, without huggingface_hub's minute of retries (read at import, so patched).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"pretrained weights could not be downloaded.*pretrained=false"):
        resolve_model("resnet10t", build_config({"pretrained": True}), 10)


def test_random_weights_are_refused_without_training_unless_opted_in() -> None:
    with pytest.raises(ModelError, match="allow_random_head=true"):
        preflight("resnet10t", build_config({"epochs": 0}))
    with pytest.raises(ModelError, match="freshly initialised"):
        resolve_model("resnet10t", build_config({"epochs": 0}), 10)
    assert resolve_model("resnet10t", build_config({"epochs": 0, "allow_random_head": True}), 10).random_head


def test_safetensors_checkpoint_names_its_architecture(tmp_path: Path) -> None:
    ref = _reference()
    path = write_safetensors(ref, "resnet10t", tmp_path / "best.safetensors")
    r = resolve_model(str(path), build_config({"epochs": 0}), 10)
    assert r.source == "checkpoint" and r.identity.startswith("sha256:") and not r.random_head
    assert _same_outputs(ref, r.module)


def test_state_dict_pt_with_architecture_prefix(tmp_path: Path) -> None:
    ref = _reference()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    r = resolve_model(f"resnet10t:{tmp_path / 'w.pt'}", build_config({"epochs": 0}), 10)
    assert _same_outputs(ref, r.module)


def test_lightning_checkpoint(tmp_path: Path) -> None:
    ref = _reference()
    module = ArmModule(ref, 10, arch="resnet10t")
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    r = resolve_model(str(tmp_path / "run.ckpt"), build_config({"epochs": 0}), 10)
    assert r.arch == "resnet10t" and _same_outputs(ref, r.module)


def test_checkpoint_with_the_wrong_number_of_classes(tmp_path: Path) -> None:
    write_safetensors(_reference(classes=5), "resnet10t", tmp_path / "five.safetensors")
    with pytest.raises(ModelError, match=r"has 5 output classes but the dataset has 10"):
        resolve_model(str(tmp_path / "five.safetensors"), build_config({"epochs": 0}), 10)


@pytest.mark.parametrize("name", ["broken.pt", "broken.safetensors", "broken.ckpt"])
def test_corrupt_checkpoint(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a checkpoint" * 10)
    with pytest.raises(ModelError, match="could not be read"):
        resolve_model(f"resnet10t:{path}", build_config({"epochs": 0}), 10)


def test_pickled_payload_is_refused_not_executed(tmp_path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(ModelError):
        resolve_model(f"resnet10t:{path}", build_config({"epochs": 0}), 10)
    assert not (tmp_path / "pwned").exists()


def test_missing_checkpoint_path() -> None:
    with pytest.raises(ModelError, match=r"checkpoint not found: '/no/such/model\.ckpt'"):
        preflight("/no/such/model.ckpt", CFG)


def test_mlflow_model_from_the_registry(tracking: str) -> None:
    import mlflow

    ref = _reference()
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            ref, name="model", export_model=True, input_example=X.numpy(), registered_model_name="digits_clf"
        )
        pickled = mlflow.pytorch.log_model(ref, name="pickled", serialization_format="pickle")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("digits_clf", "champion", "1")
    cfg = build_config({"epochs": 0})
    for spec in ("models:/digits_clf/1", "models:/digits_clf@champion"):
        r = resolve_model(spec, cfg, 10)
        assert r.source == "mlflow" and r.identity == "models:/digits_clf/1"
        assert _same_outputs(ref, r.module)
    with pytest.raises(ModelError, match="pickle serialization"):
        resolve_model(pickled.model_uri, cfg, 10)
    with pytest.raises(ModelError, match="could not be fetched"):
        resolve_model("models:/no_such_model/3", cfg, 10)


def test_expected_identity_and_preprocessing_without_weights(tmp_path: Path) -> None:
    """What an arm would record, told without building the model (tests/test_history.py checks they agree)."""
    cfg = build_config({"epochs": 0, "image_size": 48})
    assert expected_identity("resnet10t", cfg, 7) == "timm:resnet10t:pretrained=False:classes=7"
    assert expected_identity(str(tmp_path / "missing.safetensors"), cfg, 7) is None
    assert expected_identity("runs:/" + "0" * 32 + "/model", cfg, 7) is None
    path = write_safetensors(_reference(), "resnet10t", tmp_path / "w.safetensors")
    assert expected_identity(f"resnet10t:{path}", cfg, 10) == resolve_model(str(path), cfg, 10).identity
    assert expected_preprocess("resnet10t", cfg) == preprocess_for(cfg, None)  # shared: the config's
    native = build_config({"epochs": 0, "preprocess": "native"})
    built = resolve_model("resnet10t", build_config({"epochs": 1}), 10)
    assert expected_preprocess("resnet10t", native) == built.native
    assert expected_preprocess(str(path), native) is None  # the architecture is named only inside the file


def _log_stored(folder_writer, tmp_path: Path) -> str:
    """A logged model `model` of a new run, written by `folder_writer(folder, record)`; returns the run id."""
    import mlflow

    from lab import lineage

    client = mlflow.MlflowClient()
    exp = client.create_experiment("models")
    run_id = client.create_run(exp).info.run_id
    lineage.log_stored_model(client, run_id, exp, folder_writer, {})
    return run_id


def test_a_stored_model_reloads_from_runs_and_models_uris_with_its_preprocessing(tracking: str, tmp_path) -> None:
    import mlflow

    from lab.data import Preprocess
    from lab.models import model_spec, save_model_dir

    ref = _reference()
    trained_with = Preprocess(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    spec = model_spec("resnet10t", 10, trained_with, CFG)
    run_id = _log_stored(lambda folder, record: save_model_dir(ref, spec, X, folder, record), tmp_path)
    model_id = mlflow.MlflowClient().get_run(run_id).outputs.model_outputs[0].model_id
    native, shared = build_config({"epochs": 0, "preprocess": "native"}), build_config({"epochs": 0})
    for uri in (f"runs:/{run_id}/model", f"models:/{model_id}"):
        r = resolve_model(uri, native, 10)
        assert (r.source, r.arch, r.native) == ("mlflow", "resnet10t", trained_with) and not r.random_head
        assert preprocess_for(native, r.native) == trained_with == expected_preprocess(uri, native)
        assert expected_preprocess(uri, shared) == preprocess_for(shared, None)
        with torch.inference_mode():
            assert torch.equal(r.module(X), ref(X))  # the exported program computes what the module did


def test_a_model_torch_export_cannot_trace_is_stored_as_safetensors_and_reloads(tracking: str, tmp_path) -> None:
    from lab.data import Preprocess
    from lab.models import model_spec, read_spec, save_model_dir

    ref = _reference()
    spec = model_spec("resnet10t", 10, Preprocess(input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3), CFG)

    def untraceable(folder: Path, record) -> str:
        fmt = save_model_dir(ref, spec, torch.zeros(2, 3), folder, record)  # a wrong example: export fails
        assert fmt.startswith("safetensors (pt2 export failed: ") and read_spec(folder) == spec
        return fmt

    run_id = _log_stored(untraceable, tmp_path)
    r = resolve_model(f"runs:/{run_id}/model", build_config({"epochs": 0}), 10)
    assert r.arch == "resnet10t" and r.identity.startswith("sha256:") and _same_outputs(ref, r.module)
