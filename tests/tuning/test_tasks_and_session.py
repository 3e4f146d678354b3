"""Task extraction, trial budgets, work-dir manifest and database repair (no tuning runs here)."""

import json
import os
import shutil

import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models.zoo import bundled_model_path
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates
from bitq_tvm.targets import get_target, host_preset
from bitq_tvm.tuning.session import (MANIFEST_FILE, RECORD_FILE, WORKLOAD_FILE, open_work_dir, repair_database,
                                     split_trials, tune)
from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
from bitq_tvm.tuning.tasks import BfpTask, extract_bfp_tasks, extract_tasks, layer_gemm, space_configs

FMT8 = BFPFormat(8, 32)
# The kernel variant deployment and tuning use on this host (vnni or avx2, by its CPU).
HOST_VARIANT = kernel_variant(host_preset().tvm_target())


@pytest.fixture(scope="module")
def digits():
    return load_onnx(bundled_model_path())


def _candidates(model, spec):
    return LayerCandidates(CandidateSet.parse(spec)).resolve([layer.name for layer in model.layers])


def test_digits_tasks_have_expected_shapes_and_names(digits):
    tasks = extract_tasks(digits, _candidates(digits, "w=4,8;a=8;b=32"), host_preset())
    # conv1 (1 -> 16 channels, 3x3, 8x8 output): blocked along its 9-value windows, padded to 32
    # conv2 (16 -> 32): 9 x 16 -> 9 x 32; fc1 512 -> 64; fc2 64 -> 10
    shapes = {"conv1": "m64_n16_k32", "conv2": "m64_n32_k288", "fc1": "m1_n64_k512", "fc2": "m1_n10_k64"}
    expected = sorted(f"bfp_matmul_{shape}_a8b32_w{w}b32_{HOST_VARIANT}" for shape in shapes.values() for w in (4, 8))
    assert [t.name for t in tasks.bfp] == expected
    users = {u for t in tasks.bfp for u in t.users}
    assert users == {(layer, f"w{w}a8_b32") for layer in shapes for w in (4, 8)}
    fp32 = [t.name for t in tasks.fp32]
    assert fp32 and all(name.startswith("fp32_") for name in fp32)
    assert any("conv2d" in name for name in fp32) and any("matmul" in name for name in fp32)
    # names are database keys: they must not depend on the run
    again = extract_tasks(digits, _candidates(digits, "w=4,8;a=8;b=32"), host_preset(), include_fp32=False)
    assert [t.name for t in again.bfp] == expected
    assert tasks.bfp[0].prim_func().attrs["global_symbol"] == tasks.bfp[0].name


def test_block_size_sets_padded_k(digits):
    # conv2's 16 channels per kernel offset: one 16-block (K = 144) or one padded 32-block (288)
    tasks = extract_bfp_tasks(digits, _candidates(digits, "w=8;a=8;b=16,32"), host_preset())
    assert len({t.name for t in tasks}) == len(tasks) == 8
    assert layer_gemm(digits.layer("conv2"), 16) == (64, 32, 144, 1)
    assert layer_gemm(digits.layer("fc1"), 32) == (1, 64, 512, 1)


def test_block_sizes_the_kernel_cannot_take_are_an_error(digits):
    with pytest.raises(BitqError, match="block sizes that are multiples of 4"):
        extract_bfp_tasks(digits, _candidates(digits, "w=8;a=8;b=6"), host_preset())


def test_avx2_target_names_avx2_variant(digits):
    tasks = extract_bfp_tasks(digits, _candidates(digits, "w=8;a=8;b=32"), get_target("avx2"))
    assert all(t.name.endswith("_avx2") for t in tasks)


def test_split_trials_by_mac_share_with_minimum():
    big = BfpTask(256, 256, 1024, FMT8, FMT8, HOST_VARIANT)
    mid = BfpTask(64, 256, 1024, FMT8, FMT8, HOST_VARIANT)
    small = BfpTask(1, 16, 64, FMT8, FMT8, HOST_VARIANT)
    budget = split_trials([big, mid, small], 100, 4)
    assert sum(budget.values()) == 100
    assert budget[small.name] == 4  # the floor
    assert budget[big.name] > budget[mid.name] > budget[small.name]
    # 4 x 4 = 16 MACs share of 88 extra trials: big gets 4/5 of it
    assert abs(budget[big.name] - (4 + 88 * 0.8)) <= 1
    # too few for every floor: largest tasks first, the rest keep defaults
    assert split_trials([big, mid, small], 6, 4) == {big.name: 4, mid.name: 2, small.name: 0}
    assert split_trials([big, small], 50, 4, caps={small.name: 3})[small.name] == 3
    with pytest.raises(BitqError, match="--trials"):
        split_trials([big], -1, 4)


def test_space_configs_divide_the_shape():
    task = BfpTask(6, 48, 64, FMT8, FMT8, HOST_VARIANT)
    configs = space_configs(task)
    assert configs and all(6 % rows == 0 and 3 % groups == 0 and rows * groups <= 8 for rows, groups, _ in configs)
    assert {order for _, _, order in configs} == {"columns_outer", "rows_outer"}


def test_work_dir_from_another_target_or_version_is_refused(tmp_path):
    work = str(tmp_path / "db")
    open_work_dir(work, host_preset())
    open_work_dir(work, host_preset())  # same target and versions: fine
    with pytest.raises(BitqError, match="target 'host'.*'avx2'"):
        open_work_dir(work, get_target("avx2"))
    manifest = os.path.join(work, MANIFEST_FILE)
    data = json.load(open(manifest))
    data["tvm_version"] = "0.26.0"
    json.dump(data, open(manifest, "w"))
    with pytest.raises(BitqError, match="TVM version '0.26.0'"):
        open_work_dir(work, host_preset())
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / RECORD_FILE).write_text("")
    with pytest.raises(BitqError, match="without bitq_manifest.json"):
        open_work_dir(str(orphan), host_preset())
    with pytest.raises(BitqError, match="not a `bitq-tvm tune` work dir"):
        open_work_dir(str(tmp_path / "missing"), host_preset(), create=False)


def test_zero_trials_uses_defaults_and_says_so(tmp_path, capsys):
    task = BfpTask(16, 32, 64, FMT8, FMT8, HOST_VARIANT)
    summary = tune([task], host_preset(), str(tmp_path / "db"), 0)
    assert [r.source for r in summary.results] == ["default"]
    assert summary.total_trials == 0
    assert "default (hand) schedules" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "db" / RECORD_FILE)


def test_repair_truncates_partial_last_lines(tmp_path):
    work = tmp_path / "db"
    work.mkdir()
    (work / WORKLOAD_FILE).write_text('["1","AAA"]\n["2","BB')  # killed mid-line, no newline
    (work / RECORD_FILE).write_text('[0,[1]]\n[1,[2]]\n[1,[3')
    repairs = repair_database(str(work))
    assert (work / WORKLOAD_FILE).read_text() == '["1","AAA"]\n'
    # the record of the lost workload 1 goes too: it would point past the workload table
    assert (work / RECORD_FILE).read_text() == "[0,[1]]\n"
    assert len(repairs) == 3
    assert repair_database(str(work)) == ()  # idempotent
    (work / RECORD_FILE).write_text('[0,[1]]\n{"not json\n')  # a complete but broken last line
    assert repair_database(str(work))
    assert (work / RECORD_FILE).read_text() == "[0,[1]]\n"


def test_cli_tune_zero_trials_and_wrong_work_dir(tmp_path, capsys):
    import argparse

    from bitq_tvm.cli import tune as tune_command

    parser = argparse.ArgumentParser()
    tune_command.add_command(parser.add_subparsers(dest="command"))
    work = str(tmp_path / "db")
    args = parser.parse_args(["tune", str(bundled_model_path()), "--trials", "0", "--work-dir", work,
                              "--candidates", "w=8;a=8;b=32", "--no-fp32"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert f"bfp_matmul_m64_n32_k288_a8b32_w8b32_{HOST_VARIANT}" in out.out and "default" in out.out
    args = parser.parse_args(["tune", str(bundled_model_path()), "--trials", "0", "--work-dir", work,
                              "--target", "avx2"])
    with pytest.raises(BitqError, match="records are never mixed"):
        args.func(args)
    shutil.rmtree(work)


def _run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "bitq_tvm.cli", *args], capture_output=True, text=True, timeout=600)


def _one_error_line(result, expect):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("bitq-tvm: error:")]
    assert len(lines) == 1 and expect in lines[0], result.stderr


def test_a_second_tuner_on_a_work_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from bitq_tvm.tuning.session import LOCK_FILE, work_dir_lock

    work = str(tmp_path / "db")
    open_work_dir(work, host_preset())
    with work_dir_lock(work):  # this process is the running tuner
        with work_dir_lock(work):  # re-entrant for the same process (cmd_tune, then tune())
            pass
        result = _run_cli("tune", str(bundled_model_path()), "--trials", "4", "--work-dir", work)
        _one_error_line(result, f"--work-dir {work}: another `bitq-tvm tune` (pid {os.getpid()}) is tuning it")
    # a tuner killed while holding the lock leaves its pid behind; the kernel released the lock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "db" / LOCK_FILE).write_text(dead.stdout)
    result = _run_cli("tune", str(bundled_model_path()), "--trials", "0", "--work-dir", work,
                      "--candidates", "w=8;a=8;b=32", "--no-fp32")
    assert result.returncode == 0, result.stderr
    assert f"previous tuner (pid {dead.stdout.strip()}) ended without releasing it" in result.stderr


def test_a_broken_middle_line_is_reported_with_its_number_and_dropped_on_request(tmp_path):
    work = tmp_path / "db"
    work.mkdir()
    (work / WORKLOAD_FILE).write_text('["1","AAA"]\n["2","BBB"]\n["3","CCC"]\n')
    (work / RECORD_FILE).write_text('[0,[1]]\n[1,[2]]\n{"oops\n[2,[3]]\n[2,[4]]\n')
    with pytest.raises(BitqError, match=r"database_tuning_record.json line 3 is broken \(not valid JSON.*--repair"):
        repair_database(str(work))
    assert (work / RECORD_FILE).read_text().count("\n") == 5  # nothing touched without --repair
    repairs = repair_database(str(work), drop_bad_lines=True)
    assert repairs == ("database_tuning_record.json: removed 1 broken line(s)",)
    assert (work / RECORD_FILE).read_text() == '[0,[1]]\n[1,[2]]\n[2,[3]]\n[2,[4]]\n'
    # a broken workload line: its records go, later workloads' records are renumbered
    (work / WORKLOAD_FILE).write_text('["1","AAA"]\nnot json\n["3","CCC"]\n')
    with pytest.raises(BitqError, match=r"database_workload.json line 2 is broken"):
        repair_database(str(work))
    repair_database(str(work), drop_bad_lines=True)
    assert (work / WORKLOAD_FILE).read_text() == '["1","AAA"]\n["3","CCC"]\n'
    assert [json.loads(line) for line in (work / RECORD_FILE).read_text().splitlines()] == [[0, [1]], [1, [3]],
                                                                                            [1, [4]]]


def test_cli_tune_reports_a_broken_database_line_before_the_work(tmp_path):
    work = tmp_path / "db"
    open_work_dir(str(work), host_preset())
    (work / WORKLOAD_FILE).write_text('["1","AAA"]\n')
    (work / RECORD_FILE).write_text('[0,[1]]\n[0,\x00garbage\n[0,[2]]\n')
    result = _run_cli("tune", str(bundled_model_path()), "--trials", "4", "--work-dir", str(work))
    _one_error_line(result, "database_tuning_record.json line 2 is broken")
    assert "--repair" in result.stderr and "BFP GEMM task" not in result.stderr  # before task extraction


def test_cli_tune_for_a_cross_target_without_a_device_is_refused_up_front(tmp_path):
    result = _run_cli("tune", str(bundled_model_path()), "--trials", "8", "--target", "cortex-a76",
                      "--work-dir", str(tmp_path / "db"))
    _one_error_line(result, "--target cortex-a76: its kernels cannot run on this host, so tuning needs a device: "
                            "give --tracker HOST:PORT --key K")
    assert not (tmp_path / "db").exists()


def test_a_run_whose_every_trial_failed_is_an_error(tmp_path, monkeypatch, capsys):
    import argparse

    from bitq_tvm.cli import tune as tune_command
    from bitq_tvm.tuning import session
    from bitq_tvm.tuning.session import TaskResult, TuningSummary

    def all_failed(tasks, preset, work_dir, trials, *args, **kwargs):
        return TuningSummary(work_dir, preset.name, tuple(TaskResult(t.name, 4, 0, 4, 4, None, 1.0) for t in tasks))

    monkeypatch.setattr(session, "tune", all_failed)
    parser = argparse.ArgumentParser()
    tune_command.add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", str(bundled_model_path()), "--trials", "4", "--work-dir", str(tmp_path / "db"),
                              "--candidates", "w=8;a=8;b=32", "--no-fp32"])
    with pytest.raises(BitqError, match=r"all 16 trial\(s\) of this run failed to build or run on host; nothing was "
                                        r"tuned \(causes: .*meta_schedule.log\)"):
        args.func(args)
    assert "| bfp_matmul_" in capsys.readouterr().out  # the table still shows what failed
