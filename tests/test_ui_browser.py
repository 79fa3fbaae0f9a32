"""`chronoedit-lora ui` in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright against one app server on the tiny model. Each test saves a screenshot of its tab
(into $CHRONOEDIT_UI_SCREENSHOTS when set, e.g. docs/ui)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chronoedit_lora.cli import build_parser, main
from chronoedit_lora.files import save_image
from chronoedit_lora.lora import save_lora
from chronoedit_lora.train.loop.samples import CELL, COLUMNS, LABEL_HEIGHT, grid_image
from chronoedit_lora.ui.runs import REFRESH_SECONDS

from .test_data_images import png_header
from .test_train import EXAMPLE, make_subset

pytestmark = pytest.mark.slow
gr = pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EDIT = {"steps": "2", "cfg": "2", "seed": "3", "height": "32", "width": "32"}
PROMPT = "The user wants to turn the red square blue."
SCALE = 0.7
UPLOAD_LIMIT_MB = 0.1
TIMEOUT_MS = 120_000
ABANDONED_BOUND_S = 30  # the next edit's wait once the page of a long edit is closed


@pytest.fixture(scope="module")
def folders(tmp_path_factory, random_lora, input_image) -> dict[str, Path]:
    """--loras with one LoRA, --datasets with a good and a broken dataset, --runs with a logged run."""
    root = tmp_path_factory.mktemp("ui")
    found = {name: root / name for name in ("loras", "datasets", "runs", "history", "model-side")}
    save_lora(random_lora, found["loras"] / "style.safetensors")
    make_subset(found["datasets"] / "pairs", 3)
    broken = found["datasets"] / "broken"
    make_subset(broken, 2)
    with (broken / "metadata.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["before/missing.png", "after/000.png", "A row whose source is missing."])
    run = found["runs"] / "logged"
    (run / "logs").mkdir(parents=True)
    with (run / "logs" / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr", "grad_norm", "seconds", "time", "samples", "val_loss"])
        writer.writerows([[s, round(0.9 / s, 4), 1e-3, 0.5, 0.1, 1e9 + s, "0",
                           round(0.8 - 0.05 * s, 4) if s % 2 == 0 else ""] for s in range(1, 7)])
    (run / "eval").mkdir()
    (run / "eval" / "metrics.csv").write_text("checkpoint,step,clip_score\nbase,0,0.2\nstep-000002,2,0.25\n")
    shutil.copy(found["loras"] / "style.safetensors", run / "lora-step000002.safetensors")
    pair = [Image.open(EXAMPLE / folder / "000.png") for folder in ("before", "after")]
    for step in (2, 4):
        save_image(grid_image([(pair[0], pair[1], pair[1])], COLUMNS), run / "samples" / f"step-{step:06d}.png")
    found["model-side"].mkdir()
    (found["model-side"] / "secret.txt").write_text("not served")
    save_image(grid_image([(pair[0], pair[0], pair[0])], COLUMNS), found["model-side"] / "grid.png")
    (run / "samples" / "step-000006.png").symlink_to(found["model-side"] / "grid.png")  # never served
    found["image"] = root / "input.png"
    input_image.save(found["image"])
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_diffusers, folders):
    from chronoedit_lora.ui.app import serve

    args = build_parser().parse_args([
        "ui", "--model", str(tiny_diffusers), "--runs", str(folders["runs"]), "--loras", str(folders["loras"]),
        "--datasets", str(folders["datasets"]), "--history", str(folders["history"]), "--device", "cpu",
        "--dtype", "float32", "--port", str(free_port()), "--max-upload-mb", str(UPLOAD_LIMIT_MB),
        "--prompt-enhancer", "tests.captioner_plugin:enhance"])
    app, url = serve(args, block=False)
    yield url
    app.close()


@pytest.fixture(scope="module")
def browser_context():
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="chromium-profile-"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture()
def page(browser_context, server):
    page = browser_context.new_page()
    page.goto(server)
    page.wait_for_selector("#edit-run")
    yield page
    page.close()


def screenshot(page, tab: str, tmp_path: Path) -> Path:
    """A full-page screenshot of ``tab``, reduced to a small palette PNG."""
    folder = Path(os.environ.get("CHRONOEDIT_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tab}.png"
    page.screenshot(path=str(path), full_page=True)
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path


def choose(page, element_id: str, option: str) -> None:
    page.locator(f"#{element_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill(page, prefix: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        page.locator(f"#{prefix}-{key} input, #{prefix}-{key} textarea").first.fill(value)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as response:
        return response.read()


def toast(page) -> str:
    page.wait_for_selector(".toast-body")
    return page.locator(".toast-body").first.inner_text()


def test_page_edit_equals_the_cli_edit(page, server, tiny_diffusers, folders, tmp_path):
    page.set_input_files("#edit-image input[type=file]", str(folders["image"]))
    page.locator("#edit-prompt textarea").fill(PROMPT)
    fill(page, "edit", EDIT)
    choose(page, "edit-lora-0", "loras/style.safetensors")
    page.locator("#edit-scale-0 input[type=number]").fill(str(SCALE))
    page.locator("#edit-scale-0 input[type=number]").press("Enter")
    page.click("#edit-run")
    page.wait_for_selector("#edit-status :text('saved to')")
    screenshot(page, "edit", tmp_path)
    png = page.locator("#edit-downloads a[href*='edit.png']").first.get_attribute("href")
    page_edit = np.asarray(Image.open(io.BytesIO(fetch(png if png.startswith("http") else server.rstrip("/") + png))))

    common = ["--model", str(tiny_diffusers), "--image", str(folders["image"]), "--prompt", PROMPT,
              "--dtype", "float32", "--device", "cpu"] + [part for k, v in EDIT.items() for part in (f"--{k}", v)]
    with_lora, without = tmp_path / "cli.png", tmp_path / "base.png"
    lora = folders["loras"] / "style.safetensors"
    assert main(["edit", *common, "--output", str(with_lora), "--unfused", "--lora", f"{lora}:{SCALE}"]) == 0
    assert main(["edit", *common, "--output", str(without)]) == 0
    cli_edit = np.asarray(Image.open(with_lora))
    assert page_edit.shape == cli_edit.shape == (32, 32, 3)
    assert np.array_equal(page_edit, cli_edit), f"max pixel difference {np.abs(page_edit.astype(int) - cli_edit).max()}"
    assert not np.array_equal(cli_edit, np.asarray(Image.open(without)))  # the LoRA did change the edit

    entry = max((p.parent for p in folders["history"].glob("*/settings.json")), key=lambda p: p.stat().st_mtime)
    saved = json.loads((entry / "settings.json").read_text())
    assert f"{lora.resolve()}:{SCALE:g}" in saved["command"] and "--unfused" in saved["command"]
    assert np.array_equal(np.asarray(Image.open(entry / "edit.png")), cli_edit)


def saved_edits(history: Path) -> list[Path]:
    return sorted(p.parent for p in history.glob("*/settings.json"))


def test_cancel_stops_the_running_edit(page, folders):
    """A long edit is cancelled mid-way: it is never saved, and the next edit (queued behind it,
    one at a time) is the only new entry in the history."""
    before = saved_edits(folders["history"])
    page.set_input_files("#edit-image input[type=file]", str(folders["image"]))
    page.locator("#edit-prompt textarea").fill(PROMPT)
    fill(page, "edit", {**EDIT, "steps": "1000"})
    choose(page, "edit-scheduler", "euler")  # diffusers' UniPC fails an assertion at 1000 steps
    page.click("#edit-run")
    page.wait_for_selector("#edit-result :text('denoising')")  # the denoising loop's progress
    page.click("#edit-cancel")
    fill(page, "edit", EDIT)
    page.click("#edit-run")
    page.wait_for_selector("#edit-status :text('saved to')")
    new = [p for p in saved_edits(folders["history"]) if p not in before]
    assert len(new) == 1 and "--steps 2" in json.loads((new[0] / "settings.json").read_text())["command"]


def open_page(browser_context, server):
    page = browser_context.new_page()
    page.goto(server)
    page.wait_for_selector("#edit-run")
    return page


def start_edit(page, folders, prompt: str, values: dict[str, str]) -> None:
    page.set_input_files("#edit-image input[type=file]", str(folders["image"]))
    page.locator("#edit-prompt textarea").fill(prompt)
    fill(page, "edit", values)
    choose(page, "edit-scheduler", "euler")  # diffusers' UniPC fails an assertion at 1000 steps
    page.click("#edit-run")


def test_an_abandoned_edit_does_not_block_the_next(browser_context, server, folders):
    """A page closed mid-way through a 1000-step edit (about a minute on a quiet 2-core machine) stops
    it before its next step, and an edit another closed page had queued behind it never starts: a
    third page's 2-step edit is served within ABANDONED_BOUND_S (a few seconds on a quiet machine;
    the bound leaves room for a loaded one). Neither closed page's edit is saved."""
    before = saved_edits(folders["history"])
    abandoned, queued = open_page(browser_context, server), open_page(browser_context, server)
    start_edit(abandoned, folders, "Abandoned mid-way.", {**EDIT, "steps": "1000"})
    abandoned.wait_for_selector("#edit-result :text('denoising')")  # the denoising loop's progress
    start_edit(queued, folders, "Queued by a closed page.", EDIT)
    queued.wait_for_selector("#edit-result :text('queue')")  # waiting behind the running edit
    queued.close()
    abandoned.close()
    page = open_page(browser_context, server)
    started = time.monotonic()
    start_edit(page, folders, PROMPT, EDIT)
    page.wait_for_selector("#edit-status :text('saved to')", timeout=ABANDONED_BOUND_S * 1000)
    waited = time.monotonic() - started
    print(f"the next page's 2-step edit was served {waited:.1f} s after its click")
    page.close()
    new = [json.loads((p / "settings.json").read_text()) for p in saved_edits(folders["history"]) if p not in before]
    assert [entry["instruction"] for entry in new] == [PROMPT] and waited < ABANDONED_BOUND_S


def test_prompt_enhancer_and_reasoning_frames(page, folders, input_image):
    """The instruction is rewritten first (and both are saved); with temporal reasoning the clip's
    frames (reasoning frames, then the edit) are shown."""
    from chronoedit_lora.video import REASONING_FRAMES

    from .captioner_plugin import enhance

    page.set_input_files("#edit-image input[type=file]", str(folders["image"]))
    page.locator("#edit-prompt textarea").fill("Turn the square blue.")
    fill(page, "edit", {**EDIT, "reasoning": "1"})
    page.get_by_label("rewrite the instruction first").check()
    page.click("#edit-run")
    expected = enhance(input_image, "Turn the square blue.")
    page.wait_for_selector(f"#edit-status :text('prompt used: {expected}')")
    assert page.locator("#edit-frames img").count() == REASONING_FRAMES
    entry = saved_edits(folders["history"])
    settings = [json.loads((p / "settings.json").read_text()) for p in entry]
    assert any(s["prompt"] == expected and s["instruction"] == "Turn the square blue." for s in settings)


def test_a_bad_input_shows_the_kits_one_line_error(page, folders):
    page.click("#edit-run")
    assert "upload an input image first" in toast(page)
    page.reload()
    page.wait_for_selector("#edit-run")
    page.set_input_files("#edit-image input[type=file]", str(folders["image"]))
    page.locator("#edit-prompt textarea").fill(PROMPT)
    fill(page, "edit", {**EDIT, "height": "30"})
    page.click("#edit-run")
    message = toast(page)
    assert "--height 30 must be a positive multiple of 16" in message and "Traceback" not in page.content()


@pytest.mark.parametrize("kind", ["not an image", "40000x40000 PNG"])
def test_a_bad_upload_is_the_kits_one_line_message(page, tmp_path, capfd, kind):
    """An upload is decoded by the kit's checks, not Gradio's: a text file named .png and a PNG whose
    header says 40000x40000 (a few bytes) each get the kit's line in the page, no traceback anywhere."""
    if kind == "not an image":
        upload, expected = tmp_path / "notes.png", "notes.png is not an image PIL can read"
        upload.write_text("these are notes, not pixels\n")
    else:
        upload, expected = png_header(tmp_path / "huge.png", 40_000, 40_000), "at most 80 megapixels"
    page.set_input_files("#edit-image input[type=file]", str(upload))
    page.locator("#edit-prompt textarea").fill(PROMPT)
    fill(page, "edit", EDIT)
    page.click("#edit-run")
    message = toast(page).splitlines()[-1]  # below the toast's title
    assert message.startswith("input image ") and expected in message
    assert "verbose error reporting" not in page.content()
    assert "Traceback" not in "".join(capfd.readouterr())


def test_compare_grid_has_the_asked_cells(page, folders, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    page.set_input_files("#compare-image input[type=file]", str(folders["image"]))
    page.locator("#compare-prompt textarea").fill(PROMPT)
    fill(page, "compare", EDIT)
    page.get_by_label("scale sweep").check()
    choose(page, "compare-lora-a", "loras/style.safetensors")
    page.locator("#compare-scales textarea, #compare-scales input").first.fill("0, 0.5, 1")
    page.click("#compare-run-button")
    page.wait_for_selector("#compare-status :text('3 variants')")
    screenshot(page, "compare", tmp_path)
    captions = page.locator("#compare-cells .caption-label, #compare-cells figcaption").all_inner_texts()
    assert [c.strip() for c in captions] == ["style x0", "style x0.5", "style x1"]
    src = page.locator("#compare-grid img").first.get_attribute("src")
    grid = Image.open(io.BytesIO(fetch(src)))
    assert grid.size == (4 * CELL, LABEL_HEIGHT + CELL)  # input + 3 variants, one row
    cells = [np.asarray(grid.convert("RGB").crop((i * CELL, LABEL_HEIGHT, (i + 1) * CELL, LABEL_HEIGHT + CELL)))
             for i in range(4)]
    assert not np.array_equal(cells[1], cells[3])  # scale 0 and scale 1 differ: each variant has its own scale
    # the fixed LoRA under every variant (here a copy of style):
    # style x0 on top of it is style x1 alone
    choose(page, "compare-lora-base", "runs/logged/lora-step000002.safetensors")
    page.locator("#compare-scales textarea, #compare-scales input").first.fill("0")
    page.click("#compare-run-button")
    page.wait_for_selector("#compare-status :text('1 variants')")
    stacked = Image.open(io.BytesIO(fetch(page.locator("#compare-grid img").first.get_attribute("src"))))
    assert np.array_equal(np.asarray(stacked.convert("RGB").crop((CELL, LABEL_HEIGHT, 2 * CELL, LABEL_HEIGHT + CELL))),
                          cells[3])


@pytest.fixture(scope="module")
def tiny_run(folders, tiny_diffusers) -> Path:
    """A real training under --runs: configs/tiny_cpu.toml on the tiny random model (12 steps), with
    sample grids, checkpoints and a held-out evaluation every 4 steps."""
    run = folders["runs"] / "tiny-cpu"
    held_out = make_subset(folders["datasets"] / "held-out", 2, start=3)
    settings = {"model": tiny_diffusers, "dataset": folders["datasets"] / "pairs" / "metadata.csv", "output": run,
                "sample_every": 4, "sample_steps": 8, "save_every": 4, "eval_every": 4, "eval_dataset": held_out,
                "eval_steps": 4, "log_with": ""}
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.toml"
    assert main(["train", "--config", str(config), *[part for key, value in settings.items()
                                                     for part in (f"--{key}", str(value))]]) == 0
    return run


def test_runs_plot_shows_what_metrics_csv_holds(page, folders, tiny_run, tmp_path):
    page.get_by_role("tab", name="Runs").click()
    choose(page, "runs-run", "logged")
    page.wait_for_selector("#runs-plot [aria-label^='step: 6']", state="attached")  # SVG marks: not "visible"
    page.wait_for_function("() => document.querySelector('#runs-newest-sample img')?.naturalWidth > 0")
    assert page.locator("#runs-samples img").count() == 2  # both sample grids, not the link to one outside
    page.locator("#runs-metrics").get_by_label("lr").check()
    page.wait_for_selector("#runs-plot [aria-label*='metric: lr']", state="attached")
    shown = set()
    for label in page.locator("#runs-plot [aria-label^='step: ']").evaluate_all("els => els.map(e => e.ariaLabel)"):
        step, value, metric = re.match(r"step: (\d+); value: ([-\d.e]+); metric: (.+)", label).groups()
        shown.add((int(step), round(float(value), 4), metric))
    with (folders["runs"] / "logged" / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = {(int(r["step"]), round(float(r[m]), 4), m) for r in rows for m in ("loss", "val_loss", "lr") if r[m]}
    expected |= {(0, 0.2, "eval: clip_score"), (2, 0.25, "eval: clip_score")}
    assert shown == expected
    assert "step-000002" in page.locator("#runs-checkpoints").inner_text()

    wait_for_legend(page, {"loss", "val_loss", "lr", "eval: clip_score"})  # the checked metric joins the legend

    # the real run, chosen on the same page: its own sample grids, logged metrics and legend (the
    # screenshot in docs/web_app.md)
    page.get_by_role("button", name="Refresh run list").click()  # trained after the page was built
    choose(page, "runs-run", "tiny-cpu")
    grids = len(list((tiny_run / "samples").glob("*.png")))
    assert grids == 3  # steps 4, 8 and 12
    page.wait_for_function(f"() => document.querySelectorAll('#runs-samples img').length == {grids}")
    page.wait_for_selector("#runs-plot [aria-label^='step: 12']", state="attached")
    page.wait_for_function("() => document.querySelector('#runs-newest-sample img')?.naturalWidth > 0")
    assert "step-000008" in page.locator("#runs-checkpoints").inner_text()
    with (tiny_run / "logs" / "metrics.csv").open() as f:
        columns = next(csv.reader(f))
    # the new run's default metrics, not the legend of the run shown before (it had lr and eval: clip_score)
    wait_for_legend(page, {c for c in columns if c in ("loss", "val_loss") or c.startswith("eval/")})
    page.evaluate("document.querySelector('#runs-plot svg').dataset.drawn = 'once'")
    page.wait_for_timeout(2 * REFRESH_SECONDS * 1000)  # two live refreshes: new data, the same drawing
    assert page.evaluate("document.querySelector('#runs-plot svg')?.dataset.drawn") == "once"
    page.wait_for_timeout(1500)  # the gallery fades its images in: only for the screenshot
    screenshot(page, "runs", tmp_path)
    page.click("#runs-use")
    page.wait_for_function("document.querySelector('#edit-lora-0 input').value == "
                           "'runs/tiny-cpu/lora.safetensors'")


def wait_for_legend(page, labels: set[str]) -> None:
    """Wait until the Runs plot's legend shows exactly ``labels``, each with a coloured symbol (a metric
    outside the plot's colour domain gets a label but no symbol, and its line no colour)."""
    page.wait_for_function("expected => { const shown = [...document.querySelectorAll("
                           "'#runs-plot .role-legend-label text')].map(e => e.textContent).sort(); "
                           "const coloured = [...document.querySelectorAll('#runs-plot .role-legend-symbol path')]"
                           ".filter(e => (e.getAttribute('stroke') || 'none') !== 'none').length; "
                           "return JSON.stringify(shown) === JSON.stringify(expected) && coloured === expected.length; }",
                           arg=sorted(labels))


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def own_processes_ended():
    """Processes this test starts (the page's training) are ended after it, even if it fails."""
    import psutil  # accelerate's dependency

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    yield
    for child in psutil.Process().children(recursive=True):
        if child.pid not in before:
            child.terminate()


def test_training_from_the_page_stops_with_a_checkpoint_and_resumes(page, folders, tmp_path, own_processes_ended):
    from chronoedit_lora.models.loading import read_header

    page.get_by_role("tab", name="Train").click()
    run = folders["runs"] / "from-page"
    page.locator("#train-name input, #train-name textarea").first.fill("from-page")
    choose(page, "train-dataset", str(folders["datasets"] / "pairs" / "metadata.csv"))
    choose(page, "train-preset", str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.toml"))
    page.wait_for_function("document.querySelector('#train-rank input').value == '8'")  # the preset's values
    fill(page, "train", {"max_steps": "200", "save_every": "100"})
    page.locator("#train-extra input, #train-extra textarea").first.fill("--height 32 --width 32")
    page.click("#train-start")
    page.wait_for_selector("#train-status :text('running')")
    log = run / "logs" / "metrics.csv"
    wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) > 1, 180, "the first logged step")
    page.click("#train-stop")
    page.wait_for_selector("#train-status :text('stopped')")
    screenshot(page, "train", tmp_path)
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "progress.json").is_file()
    stopped_at = int(checkpoints[-1].name[5:])
    assert int(read_header(run / "lora.safetensors")[1]["step"]) == stopped_at

    fill(page, "train", {"max_steps": str(stopped_at + 1)})
    page.click("#train-resume")
    page.wait_for_selector("#train-status :text('finished')")
    assert f"resumed from {checkpoints[-1]}" in page.locator("#train-log textarea").input_value()
    assert int(read_header(run / "lora.safetensors")[1]["step"]) == stopped_at + 1


def test_a_locked_run_folder_is_refused_in_the_page(page, folders):
    from chronoedit_lora.train.state.run_folder import RunLock

    run = folders["runs"] / "locked"
    run.mkdir()
    lock = RunLock(run)
    lock.acquire()
    try:
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-name input, #train-name textarea").first.fill("locked")
        choose(page, "train-dataset", str(folders["datasets"] / "pairs" / "metadata.csv"))
        page.click("#train-start")
        assert "in use by another training run" in toast(page)  # refused before a process starts
    finally:
        lock.release()


def test_the_train_tab_cannot_write_outside_runs(page, folders, own_processes_ended):
    """Free-form settings naming an --output outside --runs, with overwrite ticked, are refused
    before any training starts: the run there keeps its files."""
    victim = folders["model-side"] / "victim-run"
    (victim / "checkpoints" / "step-000002").mkdir(parents=True)
    shutil.copy(folders["loras"] / "style.safetensors", victim / "lora.safetensors")
    kept = sorted(victim.rglob("*"))
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-name input, #train-name textarea").first.fill("escape")
    choose(page, "train-dataset", str(folders["datasets"] / "pairs" / "metadata.csv"))
    page.locator("#train-extra input, #train-extra textarea").first.fill(f"--output {victim} --height 32 --width 32")
    page.get_by_label("overwrite a previous run in this folder").check()
    page.click("#train-start")
    message = toast(page)
    assert f"--output {victim} is outside the folders this app serves" in message
    assert "No training started from this page yet" in page.locator("#train-status").inner_text()
    assert sorted(victim.rglob("*")) == kept and not (folders["runs"] / "escape").exists()


def test_dataset_problems_are_shown_on_their_rows(page, folders, tmp_path):
    page.get_by_role("tab", name="Dataset").click()
    choose(page, "dataset-csv", str(folders["datasets"] / "broken" / "metadata.csv"))
    page.wait_for_selector("#dataset-summary :text('3 rows')")
    screenshot(page, "dataset", tmp_path)
    rows = page.locator("#dataset-table [role=row]").all_inner_texts()[1:]  # below the header
    assert len(rows) == 3
    assert "missing.png" in rows[2] and "error" in rows[2]
    assert "error" not in rows[0] and "error" not in rows[1]


def test_files_outside_the_given_folders_are_refused(server, folders):
    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{server.rstrip('/')}/gradio_api/file={path}") as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(folders["runs"] / "logged" / "samples" / "step-000002.png") == 200
    for outside in (folders["model-side"] / "secret.txt", Path("/etc/passwd"),
                    folders["runs"] / ".." / "model-side" / "secret.txt"):
        assert status(outside) in (403, 404), outside

    # nor can an API call name a server file as its input image: only uploads are taken
    before = saved_edits(folders["history"])
    image = {"path": str(folders["image"]), "meta": {"_type": "gradio.FileData"}}
    form = [image, PROMPT, False, "none", 2, 2, "", "model default", 3, 32, 32, 0, "", None, 1, None, 1, None, 1]
    endpoint = f"{server.rstrip('/')}/gradio_api/call/run_edit"
    call = urllib.request.Request(endpoint, data=json.dumps({"data": form}).encode(),
                                  headers={"Content-Type": "application/json"})
    event = json.load(urllib.request.urlopen(call))["event_id"]
    assert "event: error" in fetch(f"{endpoint}/{event}").decode()
    assert saved_edits(folders["history"]) == before


def test_uploads_over_the_bound_are_refused(server):
    body = b"x" * int(UPLOAD_LIMIT_MB * 1024 * 1024 * 2)
    boundary = "chronoedit"
    data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server.rstrip('/')}/gradio_api/upload", data=data, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 413
