"""The GPU campaign (issue 14), call by call, and a dry mode that runs the same steps here.

On this machine, once per checkout (see ../shared/GPU.md):

    python scripts/gpu_campaign.py prepare              # wheels (psutil downloaded) and the 5,000-image subset into .device/
    python scripts/gpu_campaign.py command call1        # the command line to give the device tool (carry .device)

On the GPU machine each call runs one stage and copies what it made to $OUT:

    call1       set-up check (nvidia-smi -L, JAX devices, versions); the throughput table
                (haet.bench: ResNet-20 x6 at batch 32, 128 and 512, ResNet-9 at 512, bf16,
                with the end-to-end ratio); the host's share of an epoch boundary
                (scripts/bench_epoch_boundary.py, airbench94's HAET flags); the fast recipe
                at 15, 30, 60 and 120 s, seed 0.
    start600    starts a recipe at --budget=600 (--recipe, default: the default recipe; seed
                --seed) in its own process session, then waits in the call and prints the
                log's tail.
    collect600  (the next call, at once, with the same --recipe and --seed) waits for that
                run to end and copies its record, history and log.
    recipes     airbench94 in the HAET setting at 15, 30 and 60 s, again at 60 s with
                --nospan_epochs (executions that end with their epoch: the loop before
                they crossed epoch ends, 9 steps each), and Page's bag of tricks at 60 s
                (their HAET flagfiles), seed --seed.
    ensembles   the mechanism of --ensemble_members (scripts/bench_ensembles.py: airbench94
                at batch 512, bf16, 1, 2, 4 and 8 members as branches, as separate steps
                and vmapped), then airbench94 in the HAET setting at 60 s with 4 members.

Recipes at 600 s (--recipe, each a start600 + collect600 pair of calls): default (UMBC's
ResNet-20 x6), fast (Page's ResNet-9 as in flags/page_resnet9.flags), airbench_haet,
bag_of_tricks_haet (their HAET flagfiles: epochs planned to fill the budget) and
airbench_haet_ensemble4 (4 members in the one budget). Issue 14 asks for >= 3 seeds of the
default and of each fast recipe at 600 s across sessions: later sessions repeat the pairs
with --seed=1, 2.

Full CIFAR-10 (50,000 images, ~150 MB) does not fit in one call's 64 MiB (the working
tree that every call sends, plus what it carries), and ignored paths already on a warm
machine stay there between calls, so it travels in parts, as few as fit beside the
working tree as it is when they are cut (3 with a tree of 8 MiB; `prepare_full` prints
the sizes and refuses a tree that leaves no room):

    python scripts/gpu_campaign.py prepare_full         # .device_full/part1.npz ... partN.npz
    (call k = 1 ... N, carry [".device_full/partk.npz"]):  `receive`, prints the parts present
    (then, carrying nothing new)  full   assembles them with .device/cifar10_5k/test.npz (the
                                         whole test set) and runs airbench94 (9.9 epochs) and Page's
                                         bag of tricks (10 epochs) on full CIFAR-10, seeds 0, 1, 2.

The part calls must follow each other and `.device`'s call while the machine is warm
(it is given back 30 s after a call); `full` names what is missing otherwise.

The device returns at most 8 files from $OUT: each stage writes its logs, benchmark
tables, records and histories into a folder and leaves one archive, $OUT/<stage>.tar.gz.

`--dry` runs a stage here under JAX with budgets of a few seconds, tiny benchmark
settings and the data from ../shared/data, writing to --out (files under --out/files): the test of this script
(tests/test_gpu_campaign.py) runs it so that the campaign keeps working as the code
changes. Every run's record and log land in --out, even a failed one.
"""

import argparse
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREAMBLE = ("python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/*.whl "
            "&& export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 "
            "JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache || exit 1;")
FAST_RECIPE = ["--flagfile=flags/page_resnet9.flags"]
FAST_BUDGETS = (15, 30, 60, 120)
AIRBENCH_HAET = ["--flagfile=flags/airbench94.flags", "--flagfile=flags/airbench94_haet.flags"]
BAG_OF_TRICKS_HAET = ["--flagfile=flags/page_bag_of_tricks.flags", "--flagfile=flags/page_bag_of_tricks_haet.flags"]
FULL_RECIPES = (("airbench94_full", ["--flagfile=flags/airbench94.flags"]),
                ("bag_of_tricks_full", ["--flagfile=flags/page_bag_of_tricks.flags"]))
CALL_LIMIT = 64 * 2**20  # bytes one device call sends: the working tree and what it carries
CALL_MARGIN = 2 * 2**20  # room left for the tree to grow (records, logs) before the part calls
STAGES = ("prepare", "prepare_full", "command", "call1", "start600", "collect600", "recipes", "ensembles", "receive",
          "full")
RECIPES_600 = {  # --recipe of start600/collect600: its flags, and what stands for it in a dry run
    "default": ([], ["--model=tiny_cnn", "--width_multiplier=1"]),
    "fast": (FAST_RECIPE, ["--width_multiplier=0.125"]),
    "airbench_haet": (AIRBENCH_HAET, ["--width_multiplier=0.125"]),
    "bag_of_tricks_haet": (BAG_OF_TRICKS_HAET, ["--width_multiplier=0.125"]),
    "airbench_haet_ensemble4": (AIRBENCH_HAET + ["--ensemble_members=4"], ["--width_multiplier=0.125"]),
}
BENCHES = (  # name, flags
    ("resnet20x6", ["--width_multiplier=6", "--batch_sizes=32,128,512", "--precision=mixed_bfloat16"]),
    ("resnet9", ["--flagfile=flags/page_resnet9.flags", "--batch_sizes=512", "--precision=mixed_bfloat16"]),
)


class Stage:
    """Runs the commands of one stage, logging each into `out`."""

    def __init__(self, out, dry, data_dir):
        self.archive_dir, self.dry, self.data_dir = out, dry, data_dir
        self.out = os.path.join(out, "files") if dry else "/tmp/campaign_files"
        self.results = os.path.join(out, "runs") if dry else "/tmp/gpu"
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.results, exist_ok=True)
        self.failures = []

    def run(self, name, argv, timeout=None):
        """Runs `argv` (a list) from the repository root; its output goes to `out/<name>.log`."""
        log = os.path.join(self.out, f"{name}.log")
        print(f"$ {shlex.join(argv)}  > {log}", flush=True)
        env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=os.pathsep.join(
            [p for p in (os.environ.get("PYTHONPATH"), REPO) if p]))
        with open(log, "w") as f:
            try:
                code = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code != 0:
            self.failures.append(f"{name}: {code}")
        print(f"  -> {code}", flush=True)
        return code

    def train(self, name, flags, budget, data_dir=None):
        """Trains `flags` for `budget` seconds (None: the flagfile's budget)."""
        budget = 2 if self.dry else budget
        extra = ["--train_size=1000", "--eval_batch_size=500"] if self.dry else []
        return self.run(name, [sys.executable, "-m", "haet.train", *flags,
                               *([f"--budget={budget}"] if budget is not None else []),
                               f"--data_dir={data_dir or self.data_dir}", f"--results_dir={self.results}", *extra])

    def pack(self, name):
        """Writes everything in the stage's folder into one archive, `<out>/<name>.tar.gz`."""
        os.makedirs(self.archive_dir, exist_ok=True)
        path = shutil.make_archive(os.path.join(self.archive_dir, name), "gztar", root_dir=self.out)
        print(f"packed {len(os.listdir(self.out))} files into {path}", flush=True)

    def collect(self):
        """Copies every run's record and history (under a name of its folder) into `out`."""
        for record in sorted(glob.glob(os.path.join(self.results, "*", "record.json"))):
            run = os.path.basename(os.path.dirname(record))
            for name in ("record.json", "history.csv"):
                source = os.path.join(os.path.dirname(record), name)
                if os.path.exists(source):
                    shutil.copy(source, os.path.join(self.out, f"{run}_{name}"))


def call1(stage):
    if not stage.dry:
        stage.run("setup_nvidia_smi", ["nvidia-smi", "-L"])
    stage.run("setup_versions", [sys.executable, "-c", "import jax, keras, numpy; print(jax.devices(), "
                                 "jax.__version__, keras.__version__, numpy.__version__)"])
    for name, flags in BENCHES[-1:] if stage.dry else BENCHES:  # dry: one shows the path
        tiny = ["--model=tiny_cnn", "--width_multiplier=1", "--batch_sizes=32", "--precision=float32",
                "--bench_steps=3", "--end_to_end_budget=2", "--bench_test_images=50", "--train_size=1000"] if stage.dry else []
        stage.run(f"bench_{name}", [sys.executable, "-m", "haet.bench", *flags, *tiny, f"--data_dir={stage.data_dir}",
                                    f"--json={os.path.join(stage.out, f'bench_{name}.json')}"])
    # The host's share of an epoch boundary, for airbench94's HAET flags (9 steps an epoch).
    boundary = (["--width_multiplier=0.125", "--train_size=1000", "--boundaries=16"] if stage.dry else [])
    stage.run("bench_epoch_boundary", [sys.executable, "scripts/bench_epoch_boundary.py", *AIRBENCH_HAET, *boundary,
                                       f"--data_dir={stage.data_dir}",
                                       f"--json={os.path.join(stage.out, 'bench_epoch_boundary.json')}"])
    for budget in FAST_BUDGETS[:1] if stage.dry else FAST_BUDGETS:  # dry: the first shows the path
        stage.train(f"fast_{budget}s_seed0", FAST_RECIPE + (["--width_multiplier=0.125"] if stage.dry else []),
                    budget)
    stage.collect()
    stage.pack("call1")


def recipes(stage, seed):
    tiny = ["--width_multiplier=0.125"] if stage.dry else []
    for budget in (15,) if stage.dry else (15, 30, 60):  # dry: the first shows the path
        stage.train(f"airbench_haet_{budget}s_seed{seed}", AIRBENCH_HAET + tiny + [f"--seed={seed}"], budget)
    if not stage.dry:
        # The same 60 s run with an execution per epoch: what crossing epoch ends is worth on the GPU
        # (the records' executions, between_executions_seconds and steps).
        stage.train(f"airbench_haet_60s_nospan_seed{seed}", AIRBENCH_HAET + ["--nospan_epochs", f"--seed={seed}"],
                    60)
        stage.train(f"bag_of_tricks_haet_60s_seed{seed}", BAG_OF_TRICKS_HAET + [f"--seed={seed}"], 60)
    stage.collect()
    stage.pack(f"recipes_seed{seed}")


def ensembles(stage, seed):
    tiny = (["--width_multiplier=0.125", "--batch_size=32", "--members=2", "--bench_steps=2", "--train_size=1000",
             "--precision=float32"] if stage.dry else
            ["--members=1,2,4,8", "--bench_steps=20", "--precision=mixed_bfloat16"])
    stage.run("bench_ensembles", [sys.executable, "scripts/bench_ensembles.py", *AIRBENCH_HAET, *tiny,
                                  f"--data_dir={stage.data_dir}",
                                  f"--json={os.path.join(stage.out, 'bench_ensembles.json')}"])
    members = 2 if stage.dry else 4
    stage.train(f"airbench_haet_60s_ensemble{members}_seed{seed}",
                AIRBENCH_HAET + (["--width_multiplier=0.125"] if stage.dry else []) +
                [f"--ensemble_members={members}", f"--seed={seed}"], 60)
    stage.collect()
    stage.pack(f"ensembles_seed{seed}")


def travelling_bytes(repo=REPO):
    """Bytes of the working tree that every device call sends: the files git tracks and
    the untracked ones it does not ignore (the device tool's rule)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.split(b"\0")
    paths = [os.path.join(repo, os.fsdecode(name)) for name in listed if name]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p) and not os.path.islink(p))


def parts_needed(data_bytes, tree_bytes, limit=CALL_LIMIT, margin=CALL_MARGIN):
    """The fewest parts of `data_bytes` such that each, with the `tree_bytes` of the
    working tree, stays `margin` bytes under a call's `limit`.

    Raises:
        ValueError: the tree leaves no room (naming the sizes and the fix).
    """
    room = limit - tree_bytes - margin
    if room <= 0:
        raise ValueError(f"the working tree ({tree_bytes / 2**20:.1f} MiB) leaves no room in a call of "
                         f"{limit / 2**20:.0f} MiB (margin {margin / 2**20:.0f} MiB): move large files out of the "
                         "tracked tree (or ignore them) first.")
    return max(1, math.ceil(data_bytes / room))


def prepare_full(source_dir, parts_dir, parts=None):
    """Splits `source_dir/train.npz` into files `parts_dir/part<k>.npz` (each with its
    rows, `part`, `parts` and the total count) that each fit in one device call beside
    the working tree: `parts` of them, or by default as few as fit (`parts_needed`).

    Raises:
        ValueError: `parts` < 1, fewer parts than fit, or a working tree that leaves
            no room for any part.
    """
    import numpy as np

    if parts is not None and parts < 1:
        raise ValueError(f"--parts must be at least 1. Received: {parts}")
    with np.load(os.path.join(source_dir, "train.npz")) as f:
        x, y = f["x"], f["y"]
    tree = travelling_bytes()
    needed = parts_needed(x.nbytes + y.nbytes, tree)
    if parts is not None and parts < needed:
        raise ValueError(f"--parts={parts} leaves parts too large for a call beside the working tree "
                         f"({tree / 2**20:.1f} MiB): at least {needed} are needed.")
    parts = parts or needed
    print(f"working tree {tree / 2**20:.1f} MiB; {x.nbytes + y.nbytes} bytes of images and labels in {parts} parts")
    os.makedirs(parts_dir, exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(len(y)), parts), start=1):
        path = os.path.join(parts_dir, f"part{k}.npz")
        np.savez(path, x=x[rows], y=y[rows], part=k, parts=parts, total=len(y))
        size = os.path.getsize(path)
        print(f"{path}: {len(rows)} images, {size / 2**20:.1f} MiB; a call carrying it sends "
              f"{(size + tree) / 2**20:.1f} MiB of {CALL_LIMIT / 2**20:.0f}")
    return 0


def assemble_full(parts_dir, test_npz, out_dir):
    """Joins the parts of `prepare_full` into `out_dir/train.npz` and copies `test_npz`
    next to it; returns `out_dir`.

    Raises:
        FileNotFoundError: a part (or the test set) is missing, naming which.
        ValueError: parts of different splits, or a count that does not add up.
    """
    import numpy as np

    paths = sorted(glob.glob(os.path.join(parts_dir, "part*.npz")))
    if not paths:
        raise FileNotFoundError(f"no part*.npz in {parts_dir}: carry each .device_full/part<k>.npz in a call first.")
    loaded = [np.load(p) for p in paths]
    parts, total = int(loaded[0]["parts"]), int(loaded[0]["total"])
    present = sorted(int(f["part"]) for f in loaded)
    if present != list(range(1, parts + 1)) or {(int(f["parts"]), int(f["total"])) for f in loaded} != {(parts, total)}:
        missing = sorted(set(range(1, parts + 1)) - set(present))
        raise FileNotFoundError(f"{parts_dir} holds parts {present} of {parts}; missing {missing}: carry them in "
                                "calls that follow each other while the machine is warm.")
    loaded.sort(key=lambda f: int(f["part"]))
    x, y = np.concatenate([f["x"] for f in loaded]), np.concatenate([f["y"] for f in loaded])
    if len(y) != total:
        raise ValueError(f"the parts hold {len(y)} images; they were cut from {total}.")
    if not os.path.exists(test_npz):
        raise FileNotFoundError(f"{test_npz} is missing: carry .device (the 5,000-image export holds the test set).")
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "train.npz"), x=x, y=y)
    shutil.copy(test_npz, os.path.join(out_dir, "test.npz"))
    return out_dir


def receive(stage, parts_dir):
    present = {os.path.basename(p): os.path.getsize(p) for p in sorted(glob.glob(os.path.join(parts_dir, "*.npz")))}
    print("parts present: " + json.dumps(present), flush=True)


def full(stage, parts_dir, seeds=(0, 1, 2)):
    out_dir = os.path.join(stage.results if stage.dry else "/tmp", "cifar10_full")
    try:
        data_dir = assemble_full(parts_dir, os.path.join(stage.data_dir, "test.npz"), out_dir)
    except (OSError, ValueError) as e:
        print(f"full CIFAR-10 not assembled: {e}", flush=True)
        stage.failures.append(f"assemble: {e}")
        return
    tiny = ["--width_multiplier=0.125", "--batch_size=100", "--ghost_batch_splits=2"] if stage.dry else []
    for name, flags in FULL_RECIPES:
        for seed in seeds[:1] if stage.dry else seeds:
            stage.train(f"{name}_seed{seed}", flags + tiny + [f"--seed={seed}"], None, data_dir=data_dir)
    stage.collect()
    stage.pack("full_cifar10")


def _run600_paths(stage, recipe, seed):
    """The log and the pid file of a recipe's 600 s run (under /tmp on the device)."""
    folder = stage.out if stage.dry else "/tmp"
    return os.path.join(folder, f"{recipe}_600s_seed{seed}.log"), os.path.join(folder, f"{recipe}_600s.pid")


def start600(stage, seed, recipe="default"):
    flags, dry_flags = RECIPES_600[recipe]
    flags = flags + [f"--seed={seed}"] + (dry_flags if stage.dry else [])
    budget = 2 if stage.dry else 600
    argv = [sys.executable, "-m", "haet.train", *flags, f"--budget={budget}", f"--data_dir={stage.data_dir}",
            f"--results_dir={stage.results}"] + (["--train_size=1000", "--eval_batch_size=500"] if stage.dry else [])
    log, pid_file = _run600_paths(stage, recipe, seed)
    print(f"$ setsid {shlex.join(argv)} > {log} &", flush=True)
    with open(log, "w") as f:
        process = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, KERAS_BACKEND="jax"))
    with open(pid_file, "w") as f:
        f.write(str(process.pid))
    if stage.dry:
        process.wait()
    else:
        time.sleep(540)  # keep the call (and the lease) alive while it trains
    print(open(log).read()[-2000:])


def collect600(stage, seed, recipe="default"):
    log, pid_file = _run600_paths(stage, recipe, seed)
    if os.path.exists(pid_file):
        pid = int(open(pid_file).read())
        for _ in range(0 if stage.dry else 540):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
    if os.path.exists(log) and not stage.dry:
        shutil.copy(log, stage.out)
    stage.collect()
    stage.pack(f"{recipe}_600s_seed{seed}")


def fetch_psutil_wheel(folder):
    """Downloads psutil's Linux x86-64 wheel (one abi3 build for every CPython 3) into
    `folder`: the GPU machine has no psutil, and without it a run records no host_cpu
    (`haet.device.HostCpu`). Returns whether a wheel is there; a failed download
    (no package index) is printed and the campaign goes on without it."""
    if glob.glob(os.path.join(folder, "psutil-*.whl")):
        return True
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--timeout=20", "--retries=1",
                           "--no-deps", "--only-binary=:all:",
                           "--platform=manylinux2014_x86_64", "--python-version=3.12", "-d", folder, "psutil>=5.9"],
                          capture_output=True, text=True)
    if done.returncode:
        print(f"psutil's wheel could not be downloaded (runs on the device will record no host_cpu):\n"
              f"{done.stderr.strip()[-500:]}", file=sys.stderr)
    return not done.returncode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("which", nargs="?", help="command: the stage whose device command to print")
    parser.add_argument("--dry", action="store_true", help="run here under JAX with tiny budgets")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/campaign"), help="where results go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES_600),
                        help="start600/collect600: the recipe to run at 600 s")
    parser.add_argument("--data_dir", default=None, help="default: .device/cifar10_5k, or ../shared/data/cifar10 "
                        "with --dry (prepare_full: the full set to split, default ../shared/data/cifar10)")
    parser.add_argument("--parts", type=int, default=None,
                        help="prepare_full: how many parts (default: as few as fit in a call beside the working tree)")
    parser.add_argument("--parts_dir", default=os.path.join(REPO, ".device_full"),
                        help="where prepare_full writes the parts of full CIFAR-10 and receive/full read them")
    args = parser.parse_args(argv)
    if args.stage == "prepare":
        os.makedirs(os.path.join(REPO, ".device"), exist_ok=True)
        for wheel in glob.glob(os.path.join(REPO, "..", "shared", "wheels", "*.whl")):
            shutil.copy(wheel, os.path.join(REPO, ".device"))
        fetch_psutil_wheel(os.path.join(REPO, ".device"))
        return subprocess.run([sys.executable, "-m", "haet.data", "--dataset=cifar10", "--train_size=5000",
                               f"--data_dir={os.path.join(REPO, '..', 'shared', 'data', 'cifar10')}",
                               "--export_dir=.device/cifar10_5k"], cwd=REPO).returncode
    if args.stage == "prepare_full":
        source = args.data_dir or os.path.join(REPO, "..", "shared", "data", "cifar10")
        try:
            return prepare_full(source, args.parts_dir, args.parts)
        except ValueError as e:
            parser.error(str(e))
    if args.stage == "command":
        device_stages = [c for c in STAGES if c not in ("prepare", "prepare_full", "command")]
        if args.which not in device_stages:
            parser.error(f"command needs the stage to print, one of {', '.join(device_stages)}. Received: {args.which!r}")
        recipe = f" --recipe={args.recipe}" if args.which in ("start600", "collect600") else ""
        print(f"{PREAMBLE} python3 scripts/gpu_campaign.py {args.which} --out=$OUT --seed={args.seed}{recipe}")
        return 0
    shared = os.environ.get("HAET_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
    data_dir = args.data_dir or (os.path.join(shared, "cifar10") if args.dry else ".device/cifar10_5k")
    stage = Stage(args.out, args.dry, data_dir)
    {"call1": lambda: call1(stage), "start600": lambda: start600(stage, args.seed, args.recipe),
     "collect600": lambda: collect600(stage, args.seed, args.recipe), "recipes": lambda: recipes(stage, args.seed),
     "ensembles": lambda: ensembles(stage, args.seed), "receive": lambda: receive(stage, args.parts_dir),
     "full": lambda: full(stage, args.parts_dir)}[args.stage]()
    print("failures: " + (", ".join(stage.failures) or "none"))
    return 1 if stage.failures else 0


if __name__ == "__main__":
    sys.exit(main())
