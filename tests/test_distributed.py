"""clsp_jax.distributed: launch detection, the SLURM GPU launch checks, and a work dir that is not shared
between processes (2 processes on 127.0.0.1 given different work dirs fail at start, naming the problem)."""

import pytest

import multihost
from clsp_jax import distributed
from train_fixtures import ROOT, micro_args, micro_data


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "16"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, True),
])
def test_launch_detection(env, expected):
    assert distributed.launched_with_several_processes(env) is expected


def test_explicit_coordinator_needs_the_process_count_and_id():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        distributed.initialize({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})


@pytest.mark.parametrize("env,local,message", [
    # one task per GPU, but each task sees all 8 GPUs of its node
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}, 8, "this process sees 8 GPU"),
    # one task per node that sees a single GPU of 8
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}, 1, "this process sees 1 GPU"),
])
def test_slurm_gpu_launch_mistakes_are_refused(env, local, message):
    with pytest.raises(ValueError, match=message):
        distributed.check_launch("gpu", local, env)


@pytest.mark.parametrize("env,local", [
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}, 1),  # one task per GPU
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "1(x4)"}, 8),  # one task per node
    ({}, 1),  # not SLURM
])
def test_slurm_gpu_launches_that_fit_pass(env, local):
    distributed.check_launch("gpu", local, env)
    distributed.check_launch("cpu", 3, env)  # the checks are about GPUs only


def test_a_work_dir_not_shared_between_processes_stops_both(tmp_path):
    data_dir = micro_data(tmp_path / "data", clips=20)
    # Each process gets its own folder: what two hosts without a shared file system would see.
    run = multihost.launch(lambda i: micro_args(tmp_path / f"host{i}" / "run", data_dir,
                                                "--config.data.batch_size_multiple=2",
                                                "--config.train.compilation_cache_dir="), tmp_path / "logs",
                           num_processes=2, devices_per_process=1, timeout_s=180, cwd=ROOT)
    assert [p.returncode for p in run.processes] == [2, 2], run.describe()
    assert "is not shared" in run.processes[1].stderr and "[1]" in run.processes[1].stderr
    assert not (tmp_path / "host0" / "run" / "checkpoints").exists()
