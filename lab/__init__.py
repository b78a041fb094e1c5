"""ablab: settle "is model B really better than model A?" with a controlled, paired experiment."""

__version__ = "0.1.0"
