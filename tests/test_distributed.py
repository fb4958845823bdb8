"""Distributed training on CPU: run_distributed.sh -> torchrun -> train_rm.py; DDP and DeepSpeed ZeRO-2/3 over gloo.

Every run trains the tiny model from training_configs/tiny_demo.yaml on the same 16 synthetic pairs for 4 optimizer
steps of 2 pairs each (logging every step, a checkpoint every 2 steps):

    single   1 process, per-device batch 2              python train_rm.py
    ddp      2 processes, per-device batch 1            run_distributed.sh --gpus 2   (the command users type)
    resumed  ddp again, from ddp's checkpoint-2         run_distributed.sh ... --resume_from_checkpoint
    zero2    ddp + --deepspeed zero2.json               run_distributed.sh with tests/distributed_driver.py
    zero3    ddp + --deepspeed zero3.json               (same; the driver records rewards at every checkpoint)
    lora_zero2, lora_zero3   zero2 / zero3 + LoRA (vlrm.lora): rank-4 adapters on the language model and the merger,
                             the merger at its own learning rate; ZeRO-3 also with gradient checkpointing
    lora_zero3_resumed       lora_zero3 again, from its checkpoint-2

Each run is a module fixture, started by the first test that needs it (~25-35 s each on 2 cores).

Tolerances. Every run is float32, and the layouts differ only in summation order (one batch of 2 vs an all-reduce
of two batches of 1, rows padded to different lengths, DeepSpeed's bucketed and partitioned reductions). Over the 4
steps that moves losses and grad norms by at most 3.4e-6 relative (measured: 1 vs 2 processes 1.0e-6, ZeRO-2 1.0e-6,
ZeRO-3 3.4e-6, growing with the step), so trajectories are compared at rel 1e-4. Real mistakes are far larger: a
rank given the wrong pair or order changes a step's loss by ~1e-2, a missing or doubled gradient average changes
`grad_norm` by ~2x (compared too, because Adam and clipping would hide a gradient scale error from the losses).
A reloaded checkpoint repeats the exact computation of the training process, so its rewards must agree to 1e-5.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from vlrm.data.prepare import load_preference_dataset
from vlrm.data.synthetic import make_synthetic_dataset
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.layout.packed import make_collator
from vlrm.model.reward_model import VLRewardModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_distributed.sh"
TINY_DEMO = ROOT / "training_configs" / "tiny_demo.yaml"
STEPS = 4
TRAJECTORY_TOLERANCE = 1e-4  # relative, losses and grad norms across layouts (see the module docstring)
REWARD_TOLERANCE = 1e-5  # absolute, on rewards of size ~1: same weights, same computation


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env() -> dict[str, str]:
    # The checkout need not be pip-installed: train_rm.py finds vlrm next to it, the driver and this process too.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {
        "PYTHON": sys.executable,
        "PYTHONPATH": pythonpath,
        "TOKENIZERS_PARALLELISM": "false",
        # One thread per process: on a busy 2-core machine OpenMP's spinning threads make a step ~20x slower.
        "OMP_NUM_THREADS": "1",
    }
    torchrun = Path(sys.executable).with_name("torchrun")  # the one of this environment, else the script's choice
    return env | {"TORCHRUN": str(torchrun)} if torchrun.exists() else env


def check_finished(finished: subprocess.CompletedProcess, name: str) -> None:
    assert finished.returncode == 0, f"{name} failed ({finished.returncode}):\n{finished.stdout[-6000:]}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("distributed_data")
    make_synthetic_dataset(output_dir, num_train=16, num_eval=4, seed=0)
    return output_dir


@pytest.fixture(scope="module")
def launch(tmp_path_factory, tiny_model_dir, data_dir):
    """Runs tiny_demo.yaml with the test's data, steps and checkpoints; returns the output dir."""
    root = tmp_path_factory.mktemp("distributed_runs")

    def launch(name: str, processes: int, *extra: str, driver: bool = False) -> Path:
        output_dir = root / name
        overrides = [
            "--model_name_or_path", str(tiny_model_dir),
            "--dataset_path", str(data_dir / "train.jsonl"),
            "--eval_dataset_path", str(data_dir / "eval.jsonl"),
            "--output_dir", str(output_dir),
            "--log_dir", str(root / "logs" / name),
            "--max_steps", str(STEPS),
            "--per_device_train_batch_size", str(2 // processes),
            "--per_device_eval_batch_size", "4",
            "--learning_rate", "1e-3",
            "--warmup_steps", "0",
            "--logging_steps", "1",
            "--save_steps", "2",
            "--report_to", "none",
            "--data_cache_dir", str(root / "cache" / name),  # each run prepares its own data
            *extra,
        ]  # fmt: skip
        env = run_env()
        if processes == 1:
            command = [sys.executable, str(ROOT / "train_rm.py"), str(TINY_DEMO), *overrides]
        else:
            command = [str(SCRIPT), "--gpus", str(processes), "--port", str(free_port())]
            command += ["--log-dir", str(root / "launcher" / name)]
            command += ["--config", str(TINY_DEMO), "--", *overrides]
            if driver:
                env["TRAIN_SCRIPT"] = "tests/distributed_driver.py"
        finished = subprocess.run(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400
        )
        check_finished(finished, name)
        if processes > 1:
            # Clean exits (vlrm.train.process_group): every rank frees its process group before the interpreter's
            # teardown; ZeRO-3 keeps the group in its partitioned parameters, so its ranks end without the teardown.
            zero3 = any(arg.endswith("zero3.json") for arg in extra)
            said = "ends without the interpreter's teardown" if zero3 else "process group freed: no communication"
            lines = [line for line in finished.stdout.splitlines() if "process group" in line]
            assert sum(said in line for line in lines) == processes, f"{name}: " + "\n".join(lines)
        return output_dir

    return launch


@pytest.fixture(scope="module")
def single_run(launch):
    return launch("single", 1)


@pytest.fixture(scope="module")
def ddp_run(launch):
    return launch("ddp", 2)


@pytest.fixture(scope="module")
def zero_runs(launch):
    return {
        stage: launch(f"zero{stage}", 2, "--deepspeed", str(ROOT / f"zero{stage}.json"), driver=True)
        for stage in (2, 3)
    }


def step_logs(output_dir: Path, checkpoint: int = STEPS) -> dict[int, dict]:
    state = json.loads((output_dir / f"checkpoint-{checkpoint}" / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def assert_same_steps(run: dict[int, dict], reference: dict[int, dict], steps, name: str) -> None:
    for key in ("loss", "grad_norm", "learning_rate"):
        got = [run[step][key] for step in steps]
        want = [reference[step][key] for step in steps]
        assert got == pytest.approx(want, rel=TRAJECTORY_TOLERANCE), f"{name}: {key} at steps {list(steps)}"


def assert_same_rewards(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=REWARD_TOLERANCE, msg=lambda detail: f"{name}: {detail}")


def score(model_dir: Path, data_dir: Path, packing: bool = False) -> torch.Tensor:
    """Rewards of the eval pairs ([chosen..., rejected...]) from a saved model, loaded in this one process."""
    model = VLRewardModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    if packing:
        enable_packed_attention(model)
    collator = make_collator(PreferenceEncoder(AutoProcessor.from_pretrained(model_dir)), packing)
    rows, _ = load_preference_dataset(str(data_dir / "eval.jsonl"))
    batch = collator(list(rows))
    for key in ("num_pairs", "num_irrelevant", "margin"):
        batch.pop(key, None)
    with torch.no_grad():
        return model(**batch).rewards


# ----------------------------------------------------------------------------------------------------------------
# Same losses on 1 and 2 processes, and under ZeRO-2/3


def test_two_processes_match_one_process_with_the_global_batch(single_run, ddp_run):
    single, ddp = step_logs(single_run), step_logs(ddp_run)
    assert sorted(ddp) == sorted(single) == list(range(1, STEPS + 1))
    # Training moved: otherwise matching losses would prove nothing.
    assert abs(ddp[STEPS]["loss"] - ddp[1]["loss"]) > 0.01
    assert_same_steps(ddp, single, range(1, STEPS + 1), "2 processes x batch 1 vs 1 process x batch 2")


def test_only_the_main_process_prepares_the_data(ddp_run):
    (log,) = (ddp_run.parent / "launcher" / "ddp").glob("train_*.log")
    text = log.read_text()
    # Rank 0 builds the prepared set; rank 1 waits at the barrier, then loads the same files.
    assert text.count("train.jsonl: 16 of 16 pairs kept; prepared in") == 1, text[-3000:]
    assert text.count("train.jsonl: 16 of 16 pairs kept; loaded from the prepared cache") == 1, text[-3000:]
    assert "rank 0: data ready in" in text and "rank 1: data ready in" in text


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp(stage, zero_runs, ddp_run):
    assert_same_steps(step_logs(zero_runs[stage]), step_logs(ddp_run), range(1, STEPS + 1), f"ZeRO-{stage} vs DDP")


# ----------------------------------------------------------------------------------------------------------------
# ZeRO checkpoints reload in one process with the rewards the model had in training


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoints_reload_with_the_rewards_of_training(stage, zero_runs, data_dir):
    run = zero_runs[stage]
    rewards_by_step = {}
    for step in (2, STEPS):
        checkpoint = run / f"checkpoint-{step}"
        probes = [json.loads((checkpoint / f"probe_rank{rank}.json").read_text()) for rank in (0, 1)]
        for probe in probes:
            assert (probe["world_size"], probe["backend"], probe["zero_stage"]) == (2, "gloo", stage)
        # Between steps a ZeRO-3 rank keeps only empty placeholders for its large weights (its slices live in
        # DeepSpeed's buffers); ZeRO-2 keeps whole weights on every rank.
        if stage == 3:
            assert probes[0]["local_numel"] < probes[0]["full_numel"] / 10
        else:
            assert probes[0]["local_numel"] == probes[0]["full_numel"]
        assert not list(checkpoint.glob("pytorch_model*.bin")), "weights must be safetensors"
        in_training = torch.tensor(probes[0]["rewards"])
        assert_same_rewards(torch.tensor(probes[1]["rewards"]), in_training, "rank 1 vs rank 0")
        reloaded = score(checkpoint, data_dir)
        assert_same_rewards(reloaded, in_training, f"ZeRO-{stage} checkpoint-{step} reloaded vs in training")
        rewards_by_step[step] = reloaded
    # The final save_model() at the top of the output dir is the last checkpoint's model.
    assert_same_rewards(score(run, data_dir), rewards_by_step[STEPS], "final model vs last checkpoint")
    # The two checkpoints differ, so a checkpoint that kept stale weights could not pass.
    assert (rewards_by_step[2] - rewards_by_step[STEPS]).abs().max() > 100 * REWARD_TOLERANCE


def test_qwen3_5_packed_zero3_checkpoint_reloads_with_the_rewards_of_training(launch, family_dirs, data_dir):
    """Another family under ZeRO-3: Qwen3.5's packed layout (its linear-attention layers run per segment) on
    partitioned weights; the checkpoint reloads in one process with the rewards the two ranks computed."""
    run = launch(
        "qwen3_5_zero3", 2, "--model_name_or_path", str(family_dirs("qwen3_5")), "--deepspeed",
        str(ROOT / "zero3.json"), driver=True,
    )  # fmt: skip
    checkpoint = run / f"checkpoint-{STEPS}"
    probe = json.loads((checkpoint / "probe_rank0.json").read_text())
    assert probe["zero_stage"] == 3 and probe["local_numel"] < probe["full_numel"] / 10
    assert json.loads((checkpoint / "config.json").read_text())["vlrm_family"] == "qwen3_5"
    # The packed layout, as in training: the same computation, so the same rewards to round-off. (The padded layout
    # runs transformers' chunked delta rule over other chunk boundaries, a float32 difference of its own.)
    reloaded = score(checkpoint, data_dir, packing=True)
    assert_same_rewards(reloaded, torch.tensor(probe["rewards"]), "Qwen3.5 ZeRO-3 reloaded")
    torch.testing.assert_close(score(checkpoint, data_dir), reloaded, rtol=1e-4, atol=1e-5)  # and padded


def test_process_reward_trains_under_zero3_and_reloads(launch, tmp_path_factory):
    """reward_type process (a score at every step's end, step BCE) on 2 CPU processes with ZeRO-3: the ranks exit
    cleanly, the checkpoint records the process settings, and it reloads in one process to score steps."""
    from vlrm.data.synthetic_steps import make_steps_dataset
    from vlrm.use.scoring import RewardScorer

    train, held_out = make_steps_dataset(tmp_path_factory.mktemp("steps"), num_train=8, num_eval=4, image_size=56)
    run = launch(
        "process_zero3", 2, "--dataset_path", str(train), "--eval_dataset_path", str(held_out), "--reward_type",
        "process", "--deepspeed", str(ROOT / "zero3.json"), driver=True,
    )  # fmt: skip
    checkpoint = run / f"checkpoint-{STEPS}"
    probe = json.loads((checkpoint / "probe_rank0.json").read_text())
    assert probe["zero_stage"] == 3 and probe["local_numel"] < probe["full_numel"] / 10
    assert json.loads((checkpoint / "config.json").read_text())["vlrm_reward_type"] == "process"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == STEPS and all(0 < loss < 5 for loss in losses)
    # Every step of the eval set's solutions, reloaded in one process: the step rewards the two ranks computed.
    items = [
        {"prompt": row["question"], "images": [str(held_out.parent / image) for image in row["images"]],
         "steps": solution["steps"]}
        for row in map(json.loads, held_out.read_text().splitlines()) for solution in row["solutions"]
    ]  # fmt: skip
    scores = RewardScorer.from_pretrained(checkpoint, dtype="float32", device="cpu").score_steps(items)
    assert [len(steps) for steps in scores.steps] == [3] * 16
    assert_same_rewards(torch.tensor(np.concatenate(scores.rewards)), torch.tensor(probe["rewards"]), "process ZeRO-3")


# ----------------------------------------------------------------------------------------------------------------
# Resume


def test_resumed_two_process_run_continues_with_the_same_losses(launch, ddp_run, data_dir):
    resumed = launch("resumed", 2, "--resume_from_checkpoint", str(ddp_run / "checkpoint-2"))
    assert_same_steps(step_logs(resumed), step_logs(ddp_run), range(3, STEPS + 1), "resumed vs uninterrupted")
    final = f"checkpoint-{STEPS}"
    assert_same_rewards(score(resumed / final, data_dir), score(ddp_run / final, data_dir), "resumed vs uninterrupted")


# ----------------------------------------------------------------------------------------------------------------
# LoRA under ZeRO-2/3: trains, saves adapter + head, reloads with the rewards of training; the groups reach DeepSpeed

LORA_LEARNING_RATE, LORA_ALIGNER_LR = 1e-3, 3e-3
LORA_FLAGS = [
    "--use_lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_vision", "merger",
    "--aligner_lr", str(LORA_ALIGNER_LR),
]  # fmt: skip


@pytest.fixture(scope="module")
def lora_zero_runs(launch):
    runs = {}
    for stage in (2, 3):
        # ZeRO-3 + LoRA + gradient checkpointing is the 72B recipe's combination (TRL makes it reentrant).
        extra = ["--gradient_checkpointing", "true"] if stage == 3 else []
        runs[stage] = launch(
            f"lora_zero{stage}", 2, "--deepspeed", str(ROOT / f"zero{stage}.json"), *LORA_FLAGS, *extra, driver=True
        )
    return runs


def deepspeed_param_groups(checkpoint: Path) -> list[dict]:
    """The optimizer's param groups as DeepSpeed saved them (rank 0's optimizer-state file)."""
    (state_file,) = checkpoint.glob("global_step*/*zero_pp_rank_0_*optim_states.pt")
    state = torch.load(state_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    while "param_groups" not in state:  # ZeRO-2 and ZeRO-3 nest the wrapped optimizer's state differently
        state = state.get("base_optimizer_state") or state["optimizer_state_dict"]
    return state["param_groups"]


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_zero_runs_save_adapters_that_reload_with_the_rewards_of_training(stage, lora_zero_runs, data_dir):
    from vlrm.use.scoring import RewardScorer

    run = lora_zero_runs[stage]
    logs = step_logs(run)
    assert sorted(logs) == list(range(1, STEPS + 1))
    assert all(math.isfinite(entry["loss"]) and entry["grad_norm"] > 0 for entry in logs.values())
    rewards_by_step = {}
    for step in (2, STEPS):
        checkpoint = run / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "config.json").is_file()
        assert not list(checkpoint.glob("model*.safetensors")), "a LoRA checkpoint holds no base weights"
        adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
        assert adapter_config["vlrm"]["format"] == "vlrm-lora-reward-model"
        probes = [json.loads((checkpoint / f"probe_rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [(probe["world_size"], probe["zero_stage"]) for probe in probes] == [(2, stage)] * 2
        in_training = torch.tensor(probes[0]["rewards"])
        assert_same_rewards(torch.tensor(probes[1]["rewards"]), in_training, "rank 1 vs rank 0")
        # VLRewardModel.from_pretrained merges the adapter into the base model; the scorer keeps it unmerged.
        reloaded = score(checkpoint, data_dir)
        assert_same_rewards(reloaded, in_training, f"LoRA ZeRO-{stage} checkpoint-{step} reloaded vs in training")
        scorer_model = RewardScorer.from_pretrained(checkpoint, packing=False, device="cpu").model
        assert type(scorer_model).__name__ == "PeftModel"
        rewards_by_step[step] = reloaded
    assert_same_rewards(score(run, data_dir), rewards_by_step[STEPS], "final model vs last checkpoint")
    assert (rewards_by_step[2] - rewards_by_step[STEPS]).abs().max() > 100 * REWARD_TOLERANCE
    # aligner_lr reached DeepSpeed's optimizer as a param group of its own, which the schedule scales like the rest
    # (checkpoint-2: mid-schedule, where neither rate has decayed to 0 yet).
    groups = {group["name"]: group for group in deepspeed_param_groups(run / "checkpoint-2")}
    assert {name: group["initial_lr"] for name, group in groups.items()} == {
        "rest": LORA_LEARNING_RATE,
        "merger": LORA_ALIGNER_LR,
    }
    assert 0 < groups["rest"]["lr"] < LORA_LEARNING_RATE
    assert groups["merger"]["lr"] / groups["rest"]["lr"] == pytest.approx(LORA_ALIGNER_LR / LORA_LEARNING_RATE)


def test_resumed_lora_zero3_run_continues_with_the_same_losses(launch, lora_zero_runs, data_dir):
    # DeepSpeed loads the adapter and head from its own checkpoint (global_step*/, frozen weights left out).
    uninterrupted = lora_zero_runs[3]
    resumed = launch(
        "lora_zero3_resumed", 2, "--deepspeed", str(ROOT / "zero3.json"), *LORA_FLAGS, "--gradient_checkpointing",
        "true", "--resume_from_checkpoint", str(uninterrupted / "checkpoint-2"), driver=True,
    )  # fmt: skip
    assert_same_steps(
        step_logs(resumed), step_logs(uninterrupted), range(3, STEPS + 1), "LoRA resumed vs uninterrupted"
    )
    final = f"checkpoint-{STEPS}"
    assert_same_rewards(score(resumed / final, data_dir), score(uninterrupted / final, data_dir), "LoRA resumed")


# ----------------------------------------------------------------------------------------------------------------
# run_distributed.sh itself


def test_launcher_tees_every_process_to_its_log(ddp_run):
    (log_file,) = (ddp_run.parent / "launcher" / "ddp").glob("train_*.log")
    log = log_file.read_text()
    assert "2 processes (1 node(s) x 2 CPU processes (gloo))" in log
    assert "--nproc_per_node 2" in log and "training finished" in log
    assert log.count("'loss':") >= STEPS  # the processes' output is in it


def fake_tools(tmp_path: Path, cuda_devices: int, exit_code: int = 0) -> dict[str, str]:
    """A python that reports `cuda_devices` GPUs and a torchrun that prints its arguments and environment."""
    python, torchrun = tmp_path / "python", tmp_path / "torchrun"
    python.write_text(f"#!/bin/sh\necho {cuda_devices}\n")
    torchrun.write_text(
        '#!/bin/sh\necho "ARGS $*"\necho "ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-} '
        f'DS_ACCELERATOR=${{DS_ACCELERATOR:-}}"\nexit {exit_code}\n'
    )
    python.chmod(0o755)
    torchrun.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("ACCELERATE_USE_CPU", "DS_ACCELERATOR")}
    return env | {"PYTHON": str(python), "TORCHRUN": str(torchrun)}


def run_script(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_launcher_builds_the_torchrun_command(tmp_path):
    env = fake_tools(tmp_path, cuda_devices=8)
    finished = run_script(
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--gpus", "8", "--port", "29501",
        "--config", str(TINY_DEMO), "--log-dir", str(tmp_path / "logs"),
        "--", "--learning_rate", "5e-6", "--num_train_epochs", "5",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    args = next(line for line in finished.stdout.splitlines() if line.startswith("ARGS "))
    assert args == (
        "ARGS --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29501 "
        f"train_rm.py {TINY_DEMO} --learning_rate 5e-6 --num_train_epochs 5"
    )
    assert "ACCELERATE_USE_CPU= DS_ACCELERATOR=" in finished.stdout  # GPUs: nothing forced


def test_launcher_without_gpus_uses_cpu_processes_and_returns_the_exit_code(tmp_path):
    env = fake_tools(tmp_path, cuda_devices=0, exit_code=3)
    config = tmp_path / "config.yaml"
    config.write_text("model_name_or_path: m\n")
    finished = run_script("--gpus", "2", "--config", "config.yaml", "--log-dir", "logs", env=env, cwd=tmp_path)
    assert finished.returncode == 3
    assert "ACCELERATE_USE_CPU=true DS_ACCELERATOR=cpu" in finished.stdout
    assert f"--nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 train_rm.py {config}" in finished.stdout
    assert "training failed with exit code 3" in finished.stderr
    (log_file,) = (tmp_path / "logs").glob("train_*.log")
    assert "ACCELERATE_USE_CPU=true" in log_file.read_text()


def test_launcher_refuses_deepspeed_without_gpus(tmp_path):
    env = fake_tools(tmp_path, cuda_devices=0)
    for args in (["--config", str(ROOT / "training_configs" / "7b_config.yaml")],
                 ["--config", str(TINY_DEMO), "--", "--deepspeed", "zero3.json"]):  # fmt: skip
        finished = run_script("--gpus", "2", "--log-dir", "logs", *args, env=env, cwd=tmp_path)
        assert finished.returncode == 2 and "DeepSpeed needs CUDA GPUs" in finished.stderr
        assert "ARGS" not in finished.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--config FILE is required"),
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["--config", "config.txt"], "must be a .yaml, .yml or .json"),
        (["--gpu", "2", "--config", "config.yaml"], "unknown argument: --gpu"),
        (["--gpus", "0", "--config", "config.yaml"], "--gpus must be a positive integer"),
        (["--gpus", "--config", "config.yaml"], "--gpus needs a value"),
        (["--nnodes", "2", "--config", "config.yaml"], "--master-addr is required"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--config", "config.yaml"], "--node-rank"),
        (["--gpus", "16", "--config", "config.yaml"], "only 8 CUDA device(s)"),
    ],
)
def test_launcher_rejects_bad_arguments(tmp_path, args, message):
    env = fake_tools(tmp_path, cuda_devices=8)
    for name in ("config.yaml", "config.txt"):
        (tmp_path / name).write_text("model_name_or_path: m\n")
    finished = run_script(*args, env=env, cwd=tmp_path)
    assert finished.returncode == 2
    assert message in finished.stderr and "--help" in finished.stderr
    assert "ARGS" not in finished.stdout  # nothing was launched


def test_launcher_help():
    finished = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0
    assert finished.stdout.startswith("Usage: ./run_distributed.sh") and "--master-addr" in finished.stdout
