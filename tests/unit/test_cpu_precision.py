"""base/cpu.py: native bf16 from the CPU's flags (and what precision "auto" then picks),
and num_threads 0's choice from the cores, their load and the local ranks."""

import os
import sys

import pytest
import torch

import chat
from nanobumble.base import cpu
from nanobumble.base.cpu import BF16_ENV, apply_num_threads, choose_num_threads, cpu_info, cpu_summary, native_bf16
from nanobumble.base.distributed import DistInfo
from nanobumble.base.errors import ConfigError
from nanobumble.base.precision import resolve_precision
from nanobumble.evaluate import EvalConfig
from nanobumble.run.config import DPOConfig, PretrainConfig, SFTConfig, format_help, parse_config
from nanobumble.run.stage import Stage
from nanobumble.serve import ServeConfig

CPUINFO = {  # the lines of /proc/cpuinfo that matter, as each kind of machine writes them
    "zen3": "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n",
    "sapphire rapids": "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 "
                       "amx_bf16 amx_tile amx_int8\n",
    "zen4": "model name\t: AMD EPYC 9654\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n",
    "skylake": "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: avx2 avx512f avx512bw\n",
    "graviton3": "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n",
    "graviton2": "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics\n",
}
NATIVE = {"zen3": False, "sapphire rapids": True, "zen4": True, "skylake": False, "graviton3": True, "graviton2": False}


@pytest.fixture
def fake_machine(monkeypatch):
    """fake_machine(cpuinfo=..., loadavg=..., cpus=..., siblings=..., cpu_max=...): base/cpu.py reads these instead."""
    monkeypatch.delenv(BF16_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cpu.time, "sleep", lambda seconds: None)

    def fake(cpuinfo=CPUINFO["zen3"], loadavg="0.50 0.40 0.30 1/300 999", cpus=8, siblings=None, cpu_max=""):
        files = {"/proc/cpuinfo": cpuinfo, "/proc/loadavg": loadavg, "/sys/fs/cgroup/cpu.max": cpu_max}
        for i in range(cpus):
            files[f"/sys/devices/system/cpu/cpu{i}/topology/thread_siblings_list"] = (siblings or {}).get(i, str(i))
        monkeypatch.setattr(cpu, "_read", lambda path: files.get(path, ""))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        cpu_info.cache_clear()

    yield fake
    cpu_info.cache_clear()


@pytest.mark.parametrize("machine", sorted(CPUINFO))
def test_native_bf16_from_the_flags(fake_machine, machine):
    fake_machine(cpuinfo=CPUINFO[machine])
    assert native_bf16() is NATIVE[machine]
    summary = cpu_summary()
    assert summary.startswith("cpu: ") and f"native bf16: {'yes' if NATIVE[machine] else 'no'} (flags: " in summary
    expected = torch.bfloat16 if NATIVE[machine] else torch.float32
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_the_start_line_names_the_cpu_and_its_flags(fake_machine):
    fake_machine(cpuinfo=CPUINFO["zen3"])
    assert cpu_summary() == "cpu: AMD EPYC 7B13, native bf16: no (flags: avx2)"
    fake_machine(cpuinfo=CPUINFO["sapphire rapids"])
    assert cpu_summary() == ("cpu: Intel(R) Xeon(R) Platinum 8480+, native bf16: yes "
                             "(flags: amx_bf16, amx_tile, avx512_bf16, avx512f, avx2)")


def test_the_environment_variable_overrides_the_flags_both_ways(fake_machine, monkeypatch):
    fake_machine(cpuinfo=CPUINFO["zen3"])
    monkeypatch.setenv(BF16_ENV, "1")
    assert native_bf16() and resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    assert "set by NANOBUMBLE_CPU_BF16=1" in cpu_summary()
    fake_machine(cpuinfo=CPUINFO["sapphire rapids"])
    monkeypatch.setenv(BF16_ENV, "0")
    assert not native_bf16() and resolve_precision("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("flag", ["0", "1"])
def test_explicit_precisions_and_cuda_do_not_look_at_the_cpu(monkeypatch, flag):
    monkeypatch.setenv(BF16_ENV, flag)
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("flag, dtype", [("1", torch.bfloat16), ("0", torch.float32)])
def test_a_training_stage_on_cpu_prints_the_cpu_and_autocasts_where_bf16_is_native(monkeypatch, capsys, flag, dtype):
    monkeypatch.setenv(BF16_ENV, flag)
    threads = torch.get_num_threads()
    try:
        stage = Stage(PretrainConfig(max_steps=1, num_threads=1), DistInfo())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert stage.dtype == dtype and stage.autocast_dtype == dtype
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cpu: ")]
    assert len(lines) == 1 and f"native bf16: {'yes' if flag == '1' else 'no'}" in lines[0]
    assert lines[0].endswith("; threads: 1 (num_threads)")


# ---------------------------------------------------------------- threads

@pytest.mark.parametrize("cpus, runnable, local_ranks, threads", [
    (8, 1, 1, 8),  # idle: this process is the one runnable thread
    (8, 4, 1, 5),  # three threads of other processes running
    (8, 30, 1, 1),  # more busy than cores: one thread, never zero
    (8, 2, 2, 4),  # two ranks share the cores; the other rank starting is not "busy"
    (8, 6, 2, 2),  # two ranks beside 4 busy threads: 4 free cores, 2 each
    (2, 3, 1, 1),  # this machine beside one process spinning a matmul on both cores
    (2, 1, 1, 2),
])
def test_threads_are_the_free_cores_shared_between_local_ranks(fake_machine, monkeypatch, cpus, runnable,
                                                               local_ranks, threads):
    fake_machine(cpus=cpus, loadavg=f"9.00 9.00 9.00 {runnable}/400 12345")  # the lagging averages are not used
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert choose_num_threads(0)[0] == threads


def test_this_process_own_running_threads_are_not_another_process_load(fake_machine, monkeypatch):
    # A test runner or a server already running a thread of its own: /proc/loadavg counts that thread
    # as runnable too, and it used to make an idle 2-core machine look half busy (one thread chosen).
    fake_machine(cpus=2, loadavg="1.0 1.0 1.0 2/300 1")  # both runnable threads are this process's
    monkeypatch.setattr(cpu, "_own_runnable_threads", lambda: 2)
    assert choose_num_threads(0) == (2, "2 cores, 0 busy")


def test_own_running_threads_are_read_from_each_thread_state(monkeypatch):
    stats = {"1": "1 (python) R 0 1", "2": "2 (a thread) R 0 1", "3": "3 (odd) name) S 0 1", "4": "4 (x) D 0 1"}
    monkeypatch.setattr(os, "listdir", lambda path: list(stats))
    monkeypatch.setattr(cpu, "_read", lambda path: stats[path.split("/")[-2]])
    assert cpu._own_runnable_threads() == 2  # R only; a ')' inside a thread's name does not confuse it


def test_threads_count_physical_cores_and_the_cgroup_quota(fake_machine):
    fake_machine(cpus=8, siblings={i: f"{i % 4},{i % 4 + 4}" for i in range(8)})  # 4 cores, 2 threads each
    assert choose_num_threads(0) == (4, "4 cores, 0 busy")
    fake_machine(cpus=8, cpu_max="150000 100000")  # a container with --cpus 1.5
    assert choose_num_threads(0)[0] == 2
    fake_machine(cpus=8, cpu_max="max 100000")
    assert choose_num_threads(0)[0] == 8


def test_a_number_given_is_used_as_it_is(fake_machine):
    fake_machine(cpus=2, loadavg="5.0 5.0 5.0 9/300 1")
    assert choose_num_threads(3) == (3, "num_threads")
    before = torch.get_num_threads()
    try:
        assert apply_num_threads(3) == 3 and torch.get_num_threads() == 3
        assert apply_num_threads(0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


PROGRAMS = {PretrainConfig: [], SFTConfig: [], DPOConfig: [], chat.ChatConfig: [], ServeConfig: [],
            EvalConfig: ["--model_path", "m", "--tasks", "t"]}


@pytest.mark.parametrize("cls", PROGRAMS, ids=lambda cls: cls.__name__)
def test_every_program_has_num_threads(cls):
    assert parse_config([*PROGRAMS[cls], "--num_threads", "3"], cls).num_threads == 3
    assert parse_config(PROGRAMS[cls], cls).num_threads == 0
    with pytest.raises(ConfigError, match="num_threads"):
        parse_config([*PROGRAMS[cls], "--num_threads", "-1"], cls)
    assert "      CPU threads for PyTorch's operations; 0: the free physical cores" in format_help(cls)


def test_chat_applies_num_threads_and_prints_the_cpu_line(tmp_path, capsys):
    from chat_helpers import save_tiny_chat_model

    save_tiny_chat_model(tmp_path, "where do bees live? in a hive.\n" * 20, 64, {"base": "model_name_or_path: tiny\n"})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chat.main(["--model_path", str(tmp_path / "base"), "--prompt", "bees", "--max_new_tokens", "2",
                   "--num_threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("cpu: ") and line.endswith("; threads: 1 (num_threads)") for line in err), err
