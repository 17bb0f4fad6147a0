"""Bad input to the example command lines is one ``error:`` line and exit code 2, before
anything is written (issue 20, "Silent or raw"): ``examples/mlo_mae_cifar.py --set``
values checked against the settings' types with no coercion, an unwritable ``--out``,
``examples/meta_mae.py``'s non-finite or out-of-range numbers from the flags, ``--set``
or a config, and presets/configs with YAML anchors and aliases (a "billion laughs"
file is refused in microseconds with a short message)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engines.base
from problems.jobs import meta_mae_job, mlo_mae_job
from problems.jobs.mlo_mae_options import PRESETS, make_settings, parse_args, read_preset

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("restore_threads")


def error_line(main, argv, capsys):
    """``main(argv)`` must exit with code 2 and print exactly one line on stderr: it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def mlo_mae(out, *extra):
    return ["--quick", "--no-progress", "--device", "cpu", "--preset", "cpu", "--steps", "2",
            "--out", str(out), *extra]


def meta_mae(out, *extra):
    return ["--modality", "image", "--quick", "--no-progress", "--no-floors", "--out", str(out), *extra]


def laughs(header: str, indent: str = "  ") -> str:
    """A ~420-byte YAML block whose nine nested aliases expand to 9**9 strings (``*i``)."""
    names = "abcdefghi"
    lines = [f'{indent}a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip(names, names[1:]):
        lines.append(f"{indent}{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return header + "\n".join(lines) + "\n"


# ------------------------------------------------------------- mlo_mae_cifar.py --set
METHODS = ", ".join(engines.base.available())
SET_CASES = {
    "method_options=5": "--set method_options=5: method_options must be a mapping of the method's options "
                        "(e.g. {max_iter: 5}), got 5 (an integer)",
    "method=[a]": f"--set method=[a]: method must be the name of a hypergradient method, one of {METHODS}; "
                  f"got ['a'] (a list)",
    "method=fd": f"--set method=fd: method must be the name of a hypergradient method, one of {METHODS}; "
                 f"got 'fd' (a string)",
    "depth=2.7": "--set depth=2.7: depth must be an integer, got 2.7 (a float)",
    'depth="4"': "--set depth=\"4\": depth must be an integer, got '4' (a string)",
    'cosine="false"': "--set cosine=\"false\": cosine must be true or false, got 'false' (a string)",
    "cosine=0": "--set cosine=0: cosine must be true or false, got 0 (an integer)",
    'pretrain_lr="1e-3"': "--set pretrain_lr=\"1e-3\": pretrain_lr must be a finite number, got '1e-3' (a string)",
    "pretrain_lr=.nan": "--set pretrain_lr=.nan: pretrain_lr must be a finite number, got nan (a float)",
    "betas=[0.9]": "--set betas=[0.9]: betas must be a list of two finite numbers (e.g. [0.9, 0.95]), "
                   "got [0.9] (a list)",
    "pretrain_weight_decay=x": "--set pretrain_weight_decay=x: pretrain_weight_decay must be null or a finite "
                               "number, got 'x' (a string)",
    "depth=&a 3": "--set depth=&a 3: line 1: YAML anchor &a: anchors and aliases are not accepted (they can "
                  "expand a few bytes into billions of values); write the values out",
}


@pytest.mark.parametrize("item", list(SET_CASES))
def test_mlo_mae_set_values_are_checked_without_coercion(capsys, tmp_path, item):
    line = error_line(mlo_mae_job.main, mlo_mae(tmp_path / "out", "--set", item), capsys)
    assert line == f"error: {SET_CASES[item]}"
    assert not (tmp_path / "out").exists()


def test_mlo_mae_num_classes_below_the_data_is_refused_before_training(capsys, tmp_path):
    line = error_line(mlo_mae_job.main, mlo_mae(tmp_path / "out", "--set", "num_classes=2"), capsys)
    assert line == ("error: num_classes is 2 but the digits labels run 0..9 (10 classes); "
                    "set num_classes to at least 10")
    assert not (tmp_path / "out").exists()


def test_mlo_mae_images_that_do_not_fit_the_settings_are_refused(capsys, tmp_path):
    line = error_line(mlo_mae_job.main, mlo_mae(tmp_path / "out", "--set", "in_chans=3"), capsys)
    assert line == ("error: the digits images are 1x8x8 but the settings say 3x8x8 (in_chans x image_size x "
                    "image_size); set in_chans and image_size to match (e.g. --set in_chans=1 --set image_size=8)")


def test_an_old_run_survives_overwrite_with_bad_input(capsys, tmp_path):
    """--overwrite replaces the old run only once all input is read and checked."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"old": 1}')
    (out / "checkpoint.pt").write_bytes(b"old")
    line = error_line(mlo_mae_job.main, mlo_mae(out, "--overwrite", "--set", "num_classes=2"), capsys)
    assert line.startswith("error: num_classes is 2")
    assert (out / "summary.json").read_text() == '{"old": 1}' and (out / "checkpoint.pt").read_bytes() == b"old"
    line = error_line(meta_mae_job.main, meta_mae(out, "--overwrite", "--alpha", "nan"), capsys)
    assert line.startswith("error: --alpha must be")
    assert (out / "summary.json").read_text() == '{"old": 1}'


def test_valid_set_values_keep_their_type(tmp_path):
    """YAML 1.2 numbers (1e-3 a float, as in presets); ints where a float is wanted."""
    args = parse_args(["--preset", "cpu", "--set", "pretrain_lr=1e-3", "--set", "mask_lr=1",
                       "--set", "cosine=false", "--set", "method_options={iterations: 3}", "--method", "neumann"])
    s = make_settings(read_preset(PRESETS["cpu"]), args)
    assert s.pretrain_lr == 1e-3 and s.mask_lr == 1.0 and isinstance(s.mask_lr, float)
    assert s.cosine is False and s.method_options["iterations"] == 3


@pytest.mark.parametrize("settings, message", [
    ("{depth: 2.7}", "settings: depth must be an integer, got 2.7 (a float)"),
    ('{cosine: "false"}', "settings: cosine must be true or false, got 'false' (a string)"),
    ("{method: [a]}", f"settings: method must be the name of a hypergradient method, one of {METHODS}; "
                      f"got ['a'] (a list)"),
])
def test_mlo_mae_preset_settings_are_checked_too(capsys, tmp_path, settings, message):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"data: digits\nsettings: {settings}\n")
    line = error_line(mlo_mae_job.main, ["--preset-file", str(preset), "--quick", "--out", str(tmp_path / "o")],
                      capsys)
    assert line == f"error: preset {preset}: {message}"


def test_mlo_mae_preset_method_options_must_be_mappings(capsys, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: digits\nmethod_options: {cg: 5}\n")
    line = error_line(mlo_mae_job.main, ["--preset-file", str(preset), "--quick", "--out", str(tmp_path / "o")],
                      capsys)
    assert line == (f"error: preset {preset}: method_options.cg must be a mapping of that method's options, "
                    f"got 5 (an integer)")


# --------------------------------------------------------------------- unwritable --out
@pytest.mark.parametrize("main, argv", [(mlo_mae_job.main, mlo_mae), (meta_mae_job.main, meta_mae)])
def test_an_unwritable_out_is_named_before_any_work(capsys, tmp_path, main, argv):
    """Tests run as root, who may write any folder: a folder under a regular file cannot
    be created by anyone."""
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    line = error_line(main, argv(blocker / "sub"), capsys)
    assert line == f"error: --out {blocker / 'sub'}: the folder cannot be created, {blocker} is a file"
    assert blocker.read_text() == "keep me"
    line = error_line(main, argv(blocker), capsys)
    assert line == f"error: --out {blocker} is a file, not a folder"


def test_a_folder_without_write_permission_is_named(capsys, tmp_path, monkeypatch):
    """os.access stands in for a non-root user's permissions."""
    from problems.jobs import common
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(common.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    assert error_line(mlo_mae_job.main, mlo_mae(locked / "run"), capsys) == (
        f"error: --out {locked / 'run'}: the folder cannot be created, {locked} is not writable")
    assert error_line(meta_mae_job.main, meta_mae(locked), capsys) == (
        f"error: --out {locked}: the folder is not writable")


# ------------------------------------------------------------------------ meta_mae.py
META_FLAG_CASES = {
    ("--alpha", "nan"): "--alpha must be a finite number >= 0 (the inner step size), got nan (a float)",
    ("--alpha", "inf"): "--alpha must be a finite number >= 0 (the inner step size), got inf (a float)",
    ("--alpha", "-0.5"): "--alpha must be a finite number >= 0 (the inner step size), got -0.5 (a float)",
    ("--lam", "nan"): "--lam must be a finite number >= 0 (the task-contrast weight), got nan (a float)",
    ("--lam=-inf", None): "--lam must be a finite number >= 0 (the task-contrast weight), got -inf (a float)",
    ("--lam", "-1"): "--lam must be a finite number >= 0 (the task-contrast weight), got -1.0 (a float)",
    ("--support-ratio", "nan"): "--support-ratio must be a finite number in [0, 1], got nan (a float)",
    ("--steps", "0"): "--steps must be an integer >= 1, got 0 (an integer)",
    ("--decoder-depth", "-1"): "--decoder-depth must be an integer >= 0 (0: a linear decoder), got -1 (an integer)",
    ("--set", "mask_ratio=1.5"): "--set mask_ratio=1.5: mask_ratio must be a finite number in (0, 1) (some "
                                 "tokens masked, some visible), got 1.5 (a float)",
    ("--set", "heads=0"): "--set heads=0: heads must be an integer >= 1, got 0 (an integer)",
    ("--set", "depth=2.7"): "--set depth=2.7: depth must be an integer >= 1, got 2.7 (a float)",
    ("--set", 'cosine="false"'): "--set cosine=\"false\": cosine must be true or false, got 'false' (a string)",
    ("--set", "tau=0"): "--set tau=0: tau must be a finite number > 0 (the contrast's temperature), got 0 "
                        "(an integer)",
    ("--set", "heads=5"): "settings: width 64 is not divisible by heads 5",
    ("--set", "widht=3"): "--set widht=3: unknown setting 'widht'; known: ['alpha', 'batch_size', 'cosine', "
                          "'decoder_depth', 'decoder_dim', 'decoder_dropout', 'decoder_heads', 'depth', "
                          "'dropout', 'heads', 'inner_steps', 'input_dropout', 'lam', 'lr', 'mask_ratio', "
                          "'mlp_ratio', 'probe_max_iter', 'projector_hidden', 'projector_out', 'qkv_bias', "
                          "'steps', 'support_ratio', 'tau', 'weight_decay', 'width']",
}


@pytest.mark.parametrize("flag, value", list(META_FLAG_CASES))
def test_meta_mae_flags_and_set_are_checked(capsys, tmp_path, flag, value):
    extra = [flag] if value is None else [flag, value]
    line = error_line(meta_mae_job.main, meta_mae(tmp_path / "out", *extra), capsys)
    assert line == f"error: {META_FLAG_CASES[(flag, value)]}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("block, message", [
    ("cpu: {mask_ratio: 1.5}", "(cpu): mask_ratio must be a finite number in (0, 1) (some tokens masked, some "
                               "visible), got 1.5 (a float)"),
    ("paper: {heads: 0}", "(paper): heads must be an integer >= 1, got 0 (an integer)"),
    ("cpu: {depth: 2.7}", "(cpu): depth must be an integer >= 1, got 2.7 (a float)"),
    ('quick: {cosine: "false"}', "(quick): cosine must be true or false, got 'false' (a string)"),
    ("cpu: {alpha: .nan}", "(cpu): alpha must be a finite number >= 0 (the inner step size), got nan (a float)"),
    ("cpu: {lam: -1}", "(cpu): lam must be a finite number >= 0 (the task-contrast weight), got -1 (an integer)"),
    ('cpu: {width: "64"}', "(cpu): width must be an integer >= 1, got '64' (a string)"),
    ("tokenizer: {patch_size: 2.5}", ": tokenizer.patch_size must be an integer >= 1, got 2.5 (a float)"),
])
def test_meta_mae_config_values_are_checked(capsys, tmp_path, block, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"modality: image\n{block}\n")
    line = error_line(meta_mae_job.main, meta_mae(tmp_path / "out", "--config", str(config)), capsys)
    assert line == f"error: config {config}{' ' if message.startswith('(') else ''}{message}"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- YAML "billion laughs"
@pytest.mark.parametrize("which", ["mlo_mae preset", "meta_mae config"])
def test_nested_aliases_are_refused_fast_with_a_short_message(capsys, tmp_path, measured, which):
    path = tmp_path / "laughs.yaml"
    if which == "mlo_mae preset":   # before: 50 s on this machine, and a 2.8 GB message (repr of 9**9 strings)
        path.write_text(laughs("quick:\n") + "data: *i\n")
        main, argv = mlo_mae_job.main, ["--preset-file", str(path), "--quick", "--out", str(tmp_path / "o")]
    else:
        path.write_text(laughs("cpu:\n") + "modality: *i\n")
        main, argv = meta_mae_job.main, meta_mae(tmp_path / "o", "--config", str(path))
    assert 380 <= path.stat().st_size <= 460
    kind = "preset" if which == "mlo_mae preset" else "config"
    t0 = time.perf_counter()
    line = error_line(main, argv, capsys)
    seconds = time.perf_counter() - t0
    assert line == (f"error: {kind} {path}: line 2: YAML anchor &a: anchors and aliases are not accepted "
                    f"(they can expand a few bytes into billions of values); write the values out")
    assert len(line) < 300
    measured(f"billion-laughs {kind} ({path.stat().st_size} bytes) rejected in (seconds)", seconds, 30.0)
    assert not (tmp_path / "o").exists()


def test_an_alias_alone_is_refused_too(capsys, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data: digits\nsettings:\n  depth: 2\n  <<: *missing\n")
    line = error_line(mlo_mae_job.main, ["--preset-file", str(preset), "--out", str(tmp_path / "o")], capsys)
    assert line.startswith(f"error: preset {preset}: ") and len(line) < 300


# ------------------------------------------------------------------ real processes
@pytest.mark.parametrize("script, argv, expected", [
    ("mlo_mae_cifar.py", ["--preset", "cpu", "--quick", "--set", "depth=2.7"],
     "error: --set depth=2.7: depth must be an integer, got 2.7 (a float)"),
    ("meta_mae.py", ["--modality", "image", "--quick", "--alpha", "nan"],
     "error: --alpha must be a finite number >= 0 (the inner step size), got nan (a float)"),
])
def test_the_example_scripts_exit_2_with_the_line(tmp_path, script, argv, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *argv, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "o").exists()
