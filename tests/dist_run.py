"""Run by test_distributed.py, alone or under torchrun: `python dist_run.py train OUT OBJECTIVE` trains a tiny
run; `python dist_run.py sample RUN OUT.npz` samples it."""

import os
import sys

from difflab.cli import main


def gloo_threads() -> list[str]:
    """The gloo threads (pt_gloo_runloop, gloo_tcp_loop) still running in this process; [] without /proc."""
    names = []
    for t in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # that thread has just ended
            pass
    return [n for n in names if "gloo" in n]


TINY = ["--steps", "12", "--width", "16", "--depth", "1", "--set", "train.batch_size=24", "--set",
        "data.n_train=500", "--set", "train.ckpt_every=5", "--quiet", "--overwrite"]


def command(args: list[str]) -> list[str]:
    """The difflab command line of ``train OUT OBJECTIVE`` or ``sample RUN OUT.npz [SAMPLER]`` (test_distributed.py
    runs it in the test's process for the one-process reference)."""
    if args[0] == "train":
        out, objective = args[1], args[2]
        extra = ["--set", "objective.options.n_alpha=4", "--set", "objective.options.n_cdl=5"] if objective == "cdl" \
            else ["--set", f"objective.options.reference_size={64 // int(os.environ.get('WORLD_SIZE', '1'))}"] \
            if objective == "stf" else []  # references are per process and pooled: 64 in all
        return ["train", "--objective", objective, "--out", out, *TINY, *extra]
    return ["sample", args[1], "--sampler", args[3] if len(args) > 3 else "ddpm", "--steps", "30", "--n", "37",
            "--batch-size", "8", "--out", args[2], "--quiet"]


if __name__ == "__main__":
    code = main(command(sys.argv[1:]))
    # main() destroyed the process group: its threads must be gone now, not torn down at interpreter exit (where
    # that sometimes aborts, see difflab.training.distributed._import_group_defaults)
    left = gloo_threads()
    if left:
        print(f"dist_run: the process group outlived destroy_process_group: threads {left} still run",
              file=sys.stderr)
    sys.exit(code or (3 if left else 0))
