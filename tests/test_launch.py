"""The SLURM launcher's command line, run with stand-ins for ``srun``, ``scontrol`` and ``accelerate``."""

import os
import stat
import subprocess
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_sends_outputs_to_output_dir(tmp_path):
    """The job runs in a submit dir with its own ``.venv``: the script activates it, so the stand-ins live there.

    (Stand-ins earlier on PATH lose to a real venv's ``accelerate`` once the script sources ``activate``.)
    """
    submit_dir = tmp_path / "submit"
    bin_dir = submit_dir / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    log = tmp_path / "accelerate.args"
    stub(bin_dir, "scontrol", "echo node-a; echo node-b")
    stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"')
    stub(bin_dir, "accelerate", f'printf "%s\\n" "$@" > {log}')
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(submit_dir),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
           "OUTPUT_DIR": "/shared/run 1", "GPUS_PER_NODE": "4"}
    result = subprocess.run(["bash", str(REPO / "launch/slurm_multinode.sbatch"), "model.path=/m", "experts.r=8"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    args = log.read_text().splitlines()
    assert args[args.index("--num_processes") + 1] == "8" and args[args.index("--machine_rank") + 1] == "1"
    assert args[args.index("--main_process_ip") + 1] == "node-a"
    recipe = args.index("recipes/train_experts.py")
    overrides = args[recipe + 1:]
    assert overrides == ["run_dir=/shared/run 1", "model.path=/m", "experts.r=8"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_experts", overrides=overrides, return_hydra_config=True)
    assert cfg.run_dir == "/shared/run 1" and cfg.hydra.run.dir == "/shared/run 1"
