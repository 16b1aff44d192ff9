"""The `bft` command line: the verbs (cli.py), the run-file loader (config.py), `bft rebuild` and `bft plan`:
the floor above the three steps (beam_pipelines, generation, training), schemas and storage."""
from lifecycle.release import package_version

__version__ = package_version()   # setup.py owns the version
