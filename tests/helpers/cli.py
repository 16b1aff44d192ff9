"""`bft` commands run in the test's process, their output read back through pytest's capsys."""
from bft import cli


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err
