"""Threads on a shared machine: other processes' CPU use is measured, and the thread count follows it."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from gptstack import devices

linux_only = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc (Linux)")


@linux_only
def test_busy_cores_counts_other_processes_not_this_one():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert devices.busy_cores(0.5) >= 0.7
    finally:
        spin.kill()
        spin.wait()
    stop = threading.Event()

    def burn():
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=burn)
    t.start()
    try:
        own = devices.busy_cores(0.5)   # our own spinning thread is not "another process"
    finally:
        stop.set()
        t.join()
    assert own < 0.7 + max(0.0, os.getloadavg()[0] - 1.5), own


def test_threads_fit_the_free_cores_unless_chosen(monkeypatch):
    monkeypatch.delenv("GPTSTACK_THREADS", raising=False)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(devices, "_default_threads", 2)
    before = torch.get_num_threads()
    try:
        threads, notice = devices.fit_threads_to_free_cores(1.6)
        assert threads == 1 == torch.get_num_threads() and "instead of 2" in notice
        threads, notice = devices.fit_threads_to_free_cores(0.1)     # the other work is gone: back to 2
        assert threads == 2 == torch.get_num_threads() and notice is None
        monkeypatch.setenv("GPTSTACK_THREADS", "2")                   # chosen: kept, with a notice
        threads, notice = devices.fit_threads_to_free_cores(1.6)
        assert threads == 2 and "you chose" in notice
    finally:
        torch.set_num_threads(before)


def test_machine_info_records_what_a_figure_needs(monkeypatch):
    monkeypatch.delenv("GPTSTACK_CPU_BF16", raising=False)
    info = devices.machine_info(torch.device("cpu"), None, torch.float32)
    assert info["cpu"]["cores"] >= 1 and info["cpu"]["model"]
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert info["autocast"] == "fp32" and info["optimizer_matmul"] == "float32"
    assert info["bf16_probe"]["fast"] == devices.bf16_is_fast("cpu") and info["bf16_probe"]["fp32_ms"] > 0
