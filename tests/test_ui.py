"""The web app's parts without a browser: start-up refusals, logins, metrics read from run logs,
compare variants, and LoRA switching on the loaded model."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from chronoedit_lora.cli import main
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.ui.safety import check_host, login, readable

gr = pytest.importorskip("gradio")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "example.org", "::"])
def test_a_non_loopback_host_is_refused_at_start_without_auth(host, tmp_path, capsys):
    # refused before the model folder is even looked at (it does not exist)
    assert main(["ui", "--model", str(tmp_path / "no-model"), "--host", host]) == 2
    err = capsys.readouterr().err
    assert f"--host {host}" in err and "--auth" in err and "Traceback" not in err
    check_host(host, "user:secret")  # with a login it may listen there


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_auth(host):
    check_host(host, None)


def test_login_user_password_and_token():
    check = login("alice:s3cret:with-colon")
    assert check("alice", "s3cret:with-colon") and not check("alice", "wrong") and not check("bob", "s3cret:with-colon")
    token = login("tok3n")
    assert token("anyone", "tok3n") and not token("anyone", "tok3")
    with pytest.raises(ChronoEditError, match="user name and a password"):
        login(":nopassword")


def test_only_files_inside_the_served_folders_are_readable(tmp_path):
    served, other = tmp_path / "served", tmp_path / "other"
    served.mkdir(), other.mkdir()
    (served / "a.safetensors").write_bytes(b"x")
    (other / "b.safetensors").write_bytes(b"x")
    (served / "link.safetensors").symlink_to(other / "b.safetensors")
    assert readable(served / "a.safetensors", [served]) == (served / "a.safetensors").resolve()
    for outside in (other / "b.safetensors", served / "link.safetensors", served / ".." / "other" / "b.safetensors"):
        with pytest.raises(ChronoEditError, match="outside the folders"):
            readable(outside, [served, None])


def test_a_runs_files_that_lead_out_of_it_are_not_shown(tmp_path):
    """A sample grid, a checkpoint LoRA or a metrics log that is a link to a file outside the run's
    folder is neither read nor served; the run's own files are."""
    from chronoedit_lora.ui.runs import checkpoint_loras, metric_points, sample_grids

    run, elsewhere = tmp_path / "runs" / "a", tmp_path / "elsewhere"
    (run / "samples").mkdir(parents=True), (run / "logs").mkdir(), elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(run / "samples" / "step-000002.png")
    Image.new("RGB", (8, 8)).save(elsewhere / "secret.png")
    (elsewhere / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (elsewhere / "lora.safetensors").write_bytes(b"")
    (run / "samples" / "step-000004.png").symlink_to(elsewhere / "secret.png")
    (run / "logs" / "metrics.csv").symlink_to(elsewhere / "metrics.csv")
    (run / "lora-step000004.safetensors").symlink_to(elsewhere / "lora.safetensors")
    (run / "lora.safetensors").symlink_to(elsewhere / "lora.safetensors")
    (run / "lora-step000002.safetensors").write_bytes(b"")
    assert [label for _, label in sample_grids(run)] == ["step-000002"]
    assert checkpoint_loras(run) == [("step-000002", run / "lora-step000002.safetensors")]
    assert metric_points(run).empty


def test_history_entries_that_lead_out_of_it_are_not_shown(tmp_path):
    from chronoedit_lora.ui import history

    folder, elsewhere = tmp_path / "history", tmp_path / "elsewhere"
    kept = history.save(folder, Image.new("RGB", (16, 16)), [Image.new("RGB", (16, 16))])
    history.write_settings(kept, {"instruction": "kept"})
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "edit.png")
    (elsewhere / "settings.json").write_text("{}")
    for linked, own in (("edit.png", "settings.json"), ("settings.json", "edit.png")):  # one file of each links out
        entry = folder / f"linked-{linked}"
        entry.mkdir()
        (entry / linked).symlink_to(elsewhere / linked)
        shutil.copy(elsewhere / own, entry / own)
    assert [entry.folder for entry in history.entries(folder)] == [kept.folder]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_run_metrics_are_read_generically(tmp_path):
    from chronoedit_lora.ui.runs import checkpoint_table, metric_points

    run = tmp_path / "run"
    log = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": "", "seconds": 0.5, "time": 1e9 + s,
            "samples": "0 1", "val_loss": 0.5 if s == 2 else "", "eval/psnr": 20 + s if s % 2 else ""}
           for s in (1, 2, 3)]
    write_csv(run / "logs" / "metrics.csv", log)
    write_csv(run / "eval" / "metrics.csv", [{"checkpoint": "base", "step": 0, "clip": 0.1},
                                             {"checkpoint": "step-000002", "step": 2, "clip": 0.3},
                                             {"checkpoint": "final", "step": 3, "clip": 0.4}])
    for name in ("lora-step000002.safetensors", "lora.safetensors"):
        (run / name).write_bytes(b"")
    points = metric_points(run)
    found = {(int(r.step), r.metric): r.value for r in points.itertuples()}
    # every non-empty numeric cell but the bookkeeping columns (step, time, samples), read back by hand
    expected = {(int(row["step"]), key): float(value) for row in log for key, value in row.items()
                if key not in ("step", "time", "samples") and value != ""}
    expected |= {(0, "eval: clip"): 0.1, (2, "eval: clip"): 0.3, (3, "eval: clip"): 0.4}
    assert found.keys() == expected.keys()
    assert all(math.isclose(found[key], value, rel_tol=1e-12) for key, value in expected.items())

    table = checkpoint_table(run)
    assert list(table["checkpoint"]) == ["base", "step-000002", "final"]
    assert list(table["file"]) == ["(no LoRA)", "lora-step000002.safetensors", "lora.safetensors"]
    assert list(table["eval: clip"]) == [0.1, 0.3, 0.4]
    assert table["training loss"][1] == pytest.approx(0.5) and table["training loss"][2] == pytest.approx(1 / 3)


def test_compare_variants_are_labelled_and_bounded(tmp_path):
    from chronoedit_lora.ui.compare import CHECKPOINTS, MAX_VARIANTS, OFF_ON, PAIR, SWEEP, variants

    assert variants(OFF_ON, "/l/a.safetensors", 0.8, None, 1, "", None) == \
        [("no LoRA", []), ("a x0.8", [("/l/a.safetensors", 0.8)])]
    assert [label for label, _ in variants(SWEEP, "/l/a.safetensors", 1, None, 1, "0, 0.5;1", None)] == \
        ["a x0", "a x0.5", "a x1"]
    assert len(variants(PAIR, "/l/a.safetensors", 1, "/l/b.safetensors", 0.5, "", None)) == 2
    (tmp_path / "lora-step000004.safetensors").write_bytes(b"")
    (tmp_path / "lora.safetensors").write_bytes(b"")
    assert [label for label, _ in variants(CHECKPOINTS, None, 1, None, 1, "", str(tmp_path))] == \
        ["base", "step-000004", "final"]
    with pytest.raises(ChronoEditError, match="choose LoRA B"):
        variants(PAIR, "/l/a.safetensors", 1, None, 1, "", None)
    with pytest.raises(ChronoEditError, match=f"at most {MAX_VARIANTS}"):
        variants(SWEEP, "/l/a.safetensors", 1, None, 1, ",".join(["1"] * (MAX_VARIANTS + 1)), None)
    with pytest.raises(ChronoEditError, match="not a number|numbers separated"):
        variants(SWEEP, "/l/a.safetensors", 1, None, 1, "0, half", None)


@pytest.fixture(scope="module")
def session(tiny_diffusers, random_lora, tmp_path_factory):
    """The app's session on the tiny model (fp32, CPU), with one LoRA under --loras."""
    from chronoedit_lora.cli import build_parser
    from chronoedit_lora.lora import save_lora
    from chronoedit_lora.pipeline import ChronoEditPipeline
    from chronoedit_lora.ui.session import Folders, Session

    root = tmp_path_factory.mktemp("session")
    save_lora(random_lora, root / "loras" / "a.safetensors")
    args = build_parser().parse_args(["ui", "--model", str(tiny_diffusers), "--device", "cpu", "--dtype", "float32"])
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    return Session(pipe, args, Folders(None, (root / "loras").resolve(), None, root / "history"))


@pytest.fixture()
def served(session, tmp_path):
    """A session serving --runs and --datasets (one dataset of two pairs) on the tiny model, and a
    run outside them."""
    from chronoedit_lora.ui.session import Folders, Session

    from .test_train import make_subset

    runs, datasets, elsewhere = tmp_path / "runs", tmp_path / "datasets", tmp_path / "elsewhere"
    runs.mkdir(), elsewhere.mkdir()
    make_subset(datasets / "pairs", 2)
    make_subset(elsewhere / "data", 2)
    folders = Folders(runs.resolve(), None, datasets.resolve(), session.folders.history)
    return Session(session.pipe, session.args, folders), elsewhere


@pytest.mark.parametrize("extra, flag", [
    ("--output {elsewhere}/run", "--output"),
    ("--output {runs}/../elsewhere/run", "--output"),
    ("--output {runs}", "--output"),
    ("--output {runs}/link", "--output"),
    ("--dataset {elsewhere}/data/metadata.csv", "--dataset"),
    ("--dataset {datasets}/link/metadata.csv", "--dataset"),
    ("--eval_dataset {elsewhere}/data/metadata.csv --eval_every 2", "--eval_dataset"),
    ("--sample_dataset {elsewhere}/data/metadata.csv", "--sample_dataset"),
    ("--preservation_dataset {elsewhere}/data", "--preservation_dataset"),
    ("--cache true --cache_dir {elsewhere}/cache", "--cache_dir"),
    ("--resume_from {elsewhere}/run/checkpoints/step-000002", "--resume_from"),
    ("--model {elsewhere}", "--model"),
    ("--allow_outside true", "--allow_outside"),
    ("--tracker_project ../../escape", "--tracker_project"),
])
def test_the_train_tab_refuses_paths_outside_its_folders(served, extra, flag):
    """Free-form settings cannot send the training outside the served folders: each path must
    resolve (links included) inside the folder the app serves for it, checked before any process."""
    from chronoedit_lora.ui.train import train_command

    session, elsewhere = served
    runs, datasets = session.folders.runs, session.folders.datasets
    (runs / "link").symlink_to(elsewhere)
    (datasets / "link").symlink_to(elsewhere / "data")
    text = extra.format(elsewhere=elsewhere, runs=runs, datasets=datasets)
    dataset = str(datasets / "pairs" / "metadata.csv")
    with pytest.raises(ChronoEditError, match=flag) as refused:
        train_command(session, "a", dataset, None, None, {}, text, overwrite=False)
    assert "\n" not in str(refused.value)
    argv = train_command(session, "a", dataset, None, None, {}, f"--output {runs}/nested/b", overwrite=True)
    assert argv[-3:] == ["--output", f"{runs}/nested/b", "--overwrite"]  # a folder inside --runs is fine


def test_a_run_name_that_links_out_of_runs_is_refused(served):
    from chronoedit_lora.ui.train import train_command

    session, elsewhere = served
    (session.folders.runs / "victim").symlink_to(elsewhere)
    with pytest.raises(ChronoEditError, match="--output .*victim is outside the folders"):
        train_command(session, "victim", str(session.folders.datasets / "pairs" / "metadata.csv"), None, None, {}, "",
                      overwrite=True)


def test_switching_loras_needs_no_reload_and_leaves_no_trace(session, random_lora):
    """Hooks kept between edits: rescaling equals a fresh application at that scale, and removing
    them gives the base model's output bit for bit."""
    pipe = session.pipe
    x = torch.randn(3, pipe.dit.blocks[0].self_attn.q.in_features, generator=torch.Generator().manual_seed(0))
    layer = pipe.dit.blocks[0].self_attn.q
    base = layer(x)
    path = session.folders.loras / "a.safetensors"
    session.use_loras([(path, 1.0)])
    hooks = session._loras[path][1]
    session.use_loras([(path, 0.25)])
    assert session._loras[path][1] is hooks  # rescaled, not reloaded
    lora = random_lora["blocks.0.self_attn.q"]
    reference = base + 0.25 * lora.scale * (x @ lora.down.T @ lora.up.T)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-6)  # fp32 matmul order
    session.use_loras([])
    assert torch.equal(layer(x), base)
    # one file chosen twice (Compare's fixed LoRA and a variant) is stacked, as `edit --lora A:1 --lora A:0.5`
    session.use_loras([(path, 1.0), (path, 0.5)])
    stacked = base + 1.5 * lora.scale * (x @ lora.down.T @ lora.up.T)
    torch.testing.assert_close(layer(x), stacked, rtol=1e-5, atol=1e-6)
    session.use_loras([(path, 0.25)])  # back to one use: the second hook is gone
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-6)
    session.use_loras([])
    assert torch.equal(layer(x), base)


def test_an_edit_reports_each_step_and_cancel_stops_it_between_steps(session, input_image):
    from chronoedit_lora.ui.session import EditCancelled

    args = session.edit_args(prompt="x", steps=3, height=32, width=32, cfg=1.0)
    seen = []
    with session.job("page-a") as cancelled:
        result = session.edit(input_image, args, cancelled, lambda i, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)] and result.image.size == (32, 32)

    def other_pages_cancel_then_this_one(i: int, n: int) -> None:
        seen.append((i, n))
        session.cancel("page-b")  # another page's Cancel leaves this job alone
        if i == 1:
            session.cancel("page-a")

    seen.clear()
    with pytest.raises(EditCancelled, match="before step 3 of 3"), session.job("page-a") as cancelled:
        session.edit(input_image, args, cancelled, other_pages_cancel_then_this_one)
    assert seen == [(0, 3), (1, 3)]
    assert "--steps 3" in " ".join(session.command(args)) and "--unfused" in session.command(args)


def test_closing_a_page_stops_its_edit_and_refuses_its_queued_jobs(session, input_image):
    from chronoedit_lora.ui.session import EditCancelled

    args = session.edit_args(prompt="x", steps=3, height=32, width=32, cfg=1.0)
    seen = []

    def close_after_first(i: int, n: int) -> None:
        seen.append(i)
        session.page_closed("page-c")

    with pytest.raises(EditCancelled, match="before step 2 of 3"), session.job("page-c") as cancelled:
        session.edit(input_image, args, cancelled, close_after_first)
    assert seen == [0]
    with pytest.raises(EditCancelled, match="page that asked for this edit was closed"):
        with session.job("page-c"):
            pass
    with session.job("page-d") as cancelled:  # other pages go on
        assert session.edit(input_image, args, cancelled).image.size == (32, 32)


def test_auth_requires_a_login(tiny_diffusers, tmp_path):
    """With --auth the page's data and the served files need a login; a wrong password is refused."""
    import http.cookiejar
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    from chronoedit_lora.cli import build_parser
    from chronoedit_lora.ui.app import serve

    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "loss.png").write_bytes(b"\x89PNG")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = build_parser().parse_args(["ui", "--model", str(tiny_diffusers), "--runs", str(runs), "--device", "cpu",
                                      "--dtype", "float32", "--port", str(port), "--auth", "alice:s3cret",
                                      "--history", str(tmp_path / "history")])
    app, url = serve(args, block=False)
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def status(path: str, data: dict | None = None) -> int:
        request = urllib.request.Request(url + path, data=urllib.parse.urlencode(data).encode() if data else None)
        try:
            return browser.open(request).status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        served = f"gradio_api/file={runs / 'a' / 'loss.png'}"
        assert status("config") == 401 and status(served) == 401
        assert status("login", {"username": "alice", "password": "wrong"}) == 400
        assert status("login", {"username": "alice", "password": "s3cret"}) == 200
        assert status("config") == 200 and status(served) == 200
    finally:
        app.close()
