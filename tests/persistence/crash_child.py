"""A process that saves versions 1, 2, 3, ... of a small folder in a loop until it is killed (see test_folder.py).

argv: the path of transformers_spring/persistence/folder.py (loaded alone: it needs only the standard library), the
target folder, the first version, and optionally "<step>:<n>" to SIGKILL itself at the n-th pass through that step.
"""

import importlib.util
import json
import os
import signal
import sys

spec = importlib.util.spec_from_file_location("spring_folder", sys.argv[1])
folder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(folder)
target, version = sys.argv[2], int(sys.argv[3])
if len(sys.argv) > 4:
    kill_step, kill_count = sys.argv[4].split(":")
    seen = {"n": 0}

    def step(name):
        if name == kill_step:
            seen["n"] += 1
            if seen["n"] == int(kill_count):
                os.kill(os.getpid(), signal.SIGKILL)

    folder._step = step

print("ready", flush=True)
while True:
    with folder.save_folder(target, "crash-test") as staging:
        (staging / "a.json").write_text(json.dumps({"v": version}))
        (staging / "sub").mkdir()
        (staging / "sub" / "b.bin").write_bytes(version.to_bytes(8, "little") * (500 + version % 700))
        if version % 3:  # owned by some generations only: removing it when a generation drops it is tested too
            (staging / "odd.txt").write_text(str(version))
    print(f"saved {version}", flush=True)
    version += 1
