"""The `bft` command line and the storage layer shared by every stage."""
__version__ = "0.1.0"
