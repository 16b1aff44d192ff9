"""A stand-in for Beam's worker main in the warm-worker tests (runtime/warm.py): run as __main__ in a
forked worker, it prints what it was given and exits with the status asked for, or waits."""
import json
import os
import sys
import time

if __name__ == "__main__":
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                      "probe": os.environ.get("BFT_PROBE")}), flush=True)
    if os.environ.get("BFT_PROBE") == "wait":
        time.sleep(60)
    sys.exit(int(os.environ.get("BFT_PROBE_STATUS", "0")))
