"""The `bft` command line and the storage layer shared by every stage."""
from schemas.release import package_version

__version__ = package_version()   # setup.py owns the version
