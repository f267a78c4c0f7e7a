"""Model cards and Hub pushes (hub_cards/).

Card contract: the README's metadata is what huggingface_hub itself parses back (ModelCard.load, metadata_load,
model_index_to_eval_results) and its figures are the fixture's (tests/fixtures/metrics.json), written by hand in
train.py's metrics.json schema; -1 ("no ground truth", pycocotools) shows as "n/a" and stays out of the model-index.

Push contract: the real Hub is unreachable from here (no network but the package registry), so `StandInHub` below
is a small HTTP server on 127.0.0.1 that answers the Hub API routes huggingface_hub calls for create_repo /
upload_folder / whoami (read from huggingface_hub 2.4's source: POST /api/repos/create, POST /api/validate-yaml
(for README.md), POST /api/models/{repo}/preupload/{rev}, POST /api/models/{repo}/commit/{rev} with an ndjson body,
GET /api/whoami-v2, and the best-effort GET /api/agent-harnesses). Any other request is recorded and fails the test.
It answers "regular" to preupload, so every file travels base64 inside the commit and the test sees its bytes.
huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_TOKEN / HF_HUB_OFFLINE at import, so pushes run in a subprocess
with those set (and HF_HUB_OFFLINE unset), exactly as a user's process would.
"""
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from hub_cards import push_output_dir, render_model_card
from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.testing_utils import remote_code_files, tiny_kwargs

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "metrics.json"
ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
# metrics.json key -> model-index metric type (transformers' object-detection example names)
METRIC_TYPES = {"AP": "map", "AP50": "map_50", "AP75": "map_75", "AP_small": "map_small",
                "AP_medium": "map_medium", "AP_large": "map_large"}
# the remote code save_pretrained copies: the model files and what they import (convert.py, for from_pretrained)
CODE_FILES = remote_code_files()       # every file the model, config and processor import, read from the sources
PICTURES = ("loss_curve.png", "map_curve.png", "predictions.png")


def fixture_metrics() -> dict:
    return json.loads(FIXTURE.read_text())


def make_output_dir(path: Path, metrics: dict | None = None, *, pictures=PICTURES, model=False) -> Path:
    """A training output folder: config (tiny, 3 classes), metrics.json, pictures; a saved model on request."""
    config = DetrCustomConfig(**tiny_kwargs(backbone="test_resnet", id2label=ID2LABEL))
    if model:
        DetrCustomForObjectDetection(config).save_pretrained(path)
        DetrCustomImageProcessor().save_pretrained(path)
    else:
        config.save_pretrained(path)
    (path / "metrics.json").write_text(json.dumps(fixture_metrics() if metrics is None else metrics))
    for name in pictures:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(path / name)
    return path


def fmt(value: float) -> str:  # the card's table unit: COCO figures in percent, one decimal
    return f"{100 * value:.1f}"


# ---------------------------------------------------------------- card


def test_card_metadata_parses_back_with_huggingface_hub(tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    returned = render_model_card(output_dir, hub_model_id="someone/detr-shapes")
    readme = output_dir / "README.md"
    assert readme.read_text(encoding="utf-8") == str(returned)

    card = ModelCard.load(readme)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "object-detection"
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == "facebook/detr-resnet-50"
    assert {"object-detection", "detr", "vision"} <= set(card.data.tags)
    assert card.data.datasets is None  # "data/demo (COCO format)" is a local folder, not a Hub dataset id

    metadata = metadata_load(readme)
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "detr-shapes"
    best = fixture_metrics()["best"]
    expected = {metric_type: best[key] for key, metric_type in METRIC_TYPES.items() if best[key] >= 0}
    assert "map_small" not in expected  # the fixture has no small objects: AP_small is -1
    assert {r.metric_type: r.metric_value for r in results} == expected
    assert {(r.task_type, r.dataset_name, r.dataset_split) for r in results} == {
        ("object-detection", "data/demo (COCO format)", "validation")}


def test_card_sections_tables_and_pictures(tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    text = render_model_card(output_dir, hub_model_id="someone/detr-shapes").text
    metrics = fixture_metrics()
    best, last, run = metrics["best"], metrics["eval_history"][-1], metrics["run"]

    for heading in ("## Model description", "## Intended use and limitations", "## How to use", "## Training",
                    "## Evaluation"):
        assert heading in text
    assert "More information needed" not in text
    assert re.search(r"\|\s*-1(\.0*)?\s*\|", text) is None and "-100.0" not in text  # -1 is shown as n/a
    # what the model is
    assert "`test_resnet`" in text and "d_model 32" in text and "2 encoder + 2 decoder layers" in text
    assert "Object queries:** 10" in text
    assert "DETR (Carion et al. 2020)" in text and "softmax classes with a no-object class" in text
    assert "normalized over each image's unpadded region" in text
    for class_id, label in ID2LABEL.items():
        assert f"| {class_id} | {label} |" in text
    # how to use, with the conventions
    assert 'pipeline("object-detection", model="someone/detr-shapes", trust_remote_code=True)' in text
    assert 'AutoModelForObjectDetection.from_pretrained("someone/detr-shapes", trust_remote_code=True)' in text
    assert "**1 = real pixel, 0 = padding**" in text
    assert "normalized by each image's own unpadded size" in text and "absolute `(x0, y0, x1, y1)`" in text
    # recipe from the run
    for fact in (f"**Epochs:** {run['num_train_epochs']} ({run['global_steps']} optimizer steps)",
                 f"**Total batch size:** {run['total_batch_size']}", f"**Hardware:** {run['hardware']}",
                 f"**Augmentation:** {run['augmentation']}", "**Wall time:** 8 min 32 s",
                 "0.0001 (transformer and heads), 1e-05 (backbone)", f"**Training images:** {run['train_images']}"):
        assert fact in text
    # evaluation: these weights (by default the best evaluation) and the last one, -1 as n/a, per-class AP
    assert f"| this model (step {best['step']}) | last (step {last['step']}) |" in text
    assert f"evaluated at step {best['step']}, epoch {best['epoch']:g}: the best AP of the run" in text
    assert f"| AP | {fmt(best['AP'])} | {fmt(last['AP'])} |" in text
    assert f"| AP50 (IoU 0.50) | {fmt(best['AP50'])} | {fmt(last['AP50'])} |" in text
    assert "| AP small (area < 32²) | n/a | n/a |" in text
    assert f"| AP large (area > 96²) | {fmt(best['AP_large'])} | {fmt(last['AP_large'])} |" in text
    assert f"| 0 | circle | {fmt(best['AP_per_class']['circle'])} |" in text
    assert "| 2 | triangle | n/a |" in text
    for picture in PICTURES:
        assert f"]({picture})" in text


def test_card_reports_the_evaluation_of_the_saved_weights(tmp_path):
    (tmp_path / "shapes-run").mkdir()
    output_dir = make_output_dir(tmp_path / "shapes-run" / "last")  # train.py's OUTPUT_DIR/last
    metrics = fixture_metrics()
    best, last = metrics["best"], metrics["eval_history"][-1]
    card = render_model_card(output_dir, eval_step=last["step"])  # a folder holding the last weights

    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "shapes-run" and card.text.startswith("\n# shapes-run\n")
    assert {r.metric_type: r.metric_value for r in results} == {
        metric_type: last[key] for key, metric_type in METRIC_TYPES.items() if last[key] >= 0}
    assert f"| this model (step {last['step']}) | best of the run (step {best['step']}) |" in card.text
    assert f"| AP | {fmt(last['AP'])} | {fmt(best['AP'])} |" in card.text
    assert f"| 0 | circle | {fmt(last['AP_per_class']['circle'])} |" in card.text

    unevaluated = render_model_card(output_dir, eval_step=last["step"] + 1)
    assert "model-index" not in unevaluated.data.to_dict()
    assert f"These weights (step {last['step'] + 1}) were not evaluated" in unevaluated.text


def test_card_counts_the_saved_parameters(tmp_path):
    output_dir = make_output_dir(tmp_path / "run", model=True)
    model = DetrCustomForObjectDetection.from_pretrained(output_dir)
    count = sum(tensor.numel() for tensor in model.state_dict().values())  # what save_pretrained stored
    text = render_model_card(output_dir).text
    assert f"- **Parameters:** {count / 1e6:.1f} M ({count:,} values in model.safetensors)" in text

    (output_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        render_model_card(output_dir)


def test_card_omits_what_was_not_measured(tmp_path):
    metrics = fixture_metrics()
    metrics["run"] = {"model_name_or_path": None, "dataset": "detection-datasets/coco",
                      "dataset_id": "detection-datasets/coco", "num_train_epochs": 2}
    metrics["eval_history"], metrics["best"] = [], None
    output_dir = make_output_dir(tmp_path / "scratch", metrics, pictures=("loss_curve.png",))
    card = render_model_card(output_dir)

    assert "model-index" not in card.data.to_dict() and card.data.base_model is None
    assert card.data.datasets == ["detection-datasets/coco"]
    assert card.data.license is None
    text = card.text
    assert "not evaluated during this run" in text and "More information needed" not in text
    assert "trained from scratch" in text and "Wall time" not in text and "Hardware" not in text
    assert "Parameters" not in text  # no model.safetensors in the folder
    assert "](loss_curve.png)" in text and "map_curve.png" not in text and "predictions.png" not in text
    assert f'model="{output_dir}"' in text and "# scratch" in text  # without a Hub id, the examples load the folder


def test_card_needs_config_and_metrics(tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    (output_dir / "metrics.json").unlink()
    with pytest.raises(ValueError, match="metrics.json not found"):
        render_model_card(output_dir)
    (output_dir / "metrics.json").write_text(json.dumps({"train_history": []}))
    with pytest.raises(ValueError, match="no 'run' object"):
        render_model_card(output_dir)
    (output_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json not found"):
        render_model_card(output_dir)


def run_python(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def clean_env(tmp_path: Path, **extra) -> dict:
    """The environment of a user's process: no token, no offline switch, a fresh HF_HOME."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                        "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def test_render_cli(tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    result = run_python(["-m", "hub_cards.render", str(output_dir), "--hub-model-id", "someone/detr-shapes"],
                        clean_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr
    readme = output_dir / "README.md"
    assert result.stdout.strip() == f"wrote {readme}"
    written = readme.read_text(encoding="utf-8")
    assert written == str(render_model_card(output_dir, hub_model_id="someone/detr-shapes"))  # the same card
    card = ModelCard.load(readme)
    assert 'model="someone/detr-shapes"' in card.text and card.data.pipeline_tag == "object-detection"


# ---------------------------------------------------------------- token


def test_check_hub_token_without_token_fails_with_instructions(tmp_path):
    code = "from hub_cards import check_hub_token; check_hub_token()"
    result = run_python(["-c", code], clean_env(tmp_path))
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "none was found" in result.stderr
    assert "HF_TOKEN" in result.stderr and "hf auth login" in result.stderr and "before training" in result.stderr
    assert "training: --hub_token; `python -m hub_cards.push`: --token" in result.stderr   # each its real flag

    found = run_python(["-c", "from hub_cards import check_hub_token; print(check_hub_token())"],
                       clean_env(tmp_path, HF_TOKEN="hf_from_env"))
    assert found.returncode == 0 and found.stdout.strip() == "hf_from_env"
    offline = run_python(["-c", code], clean_env(tmp_path, HF_TOKEN="hf_from_env", HF_HUB_OFFLINE="1"))
    assert offline.returncode != 0 and "HF_HUB_OFFLINE is set" in offline.stderr

    with socket.socket() as probe:  # a port nobody listens on once closed: the Hub is unreachable
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    unreachable = run_python(["-c", "from hub_cards import check_hub_token; check_hub_token(verify=True)"],
                             clean_env(tmp_path, HF_TOKEN="hf_from_env", HF_ENDPOINT=closed))
    assert unreachable.returncode != 0 and f"Could not reach the Hub at {closed}" in unreachable.stderr


# ---------------------------------------------------------------- push


class StandInHub(ThreadingHTTPServer):
    """Records repo creations and commits; see the module docstring for why this stands in for the Hub."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)  # port 0: a free port
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.created, self.commits, self.auth, self.unexpected = [], [], set(), []


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, payload, status=200):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        hub = self.server
        if self.path == "/api/whoami-v2":
            hub.auth.add(self.headers.get("Authorization"))
            role = "read" if "hf_read" in str(self.headers.get("Authorization")) else "write"
            return self._reply({"type": "user", "name": "user", "auth": {"accessToken": {"role": role}}})
        if self.path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry, fetched best-effort
            return self._reply({"standardEnvVars": [], "harnesses": {}})
        hub.unexpected.append(("GET", self.path))
        self._reply({"error": "not in the stand-in"}, 404)

    def do_POST(self):
        hub, body = self.server, self._body()
        hub.auth.add(self.headers.get("Authorization"))
        parts = self.path.split("?")[0].strip("/").split("/")  # api / models / owner / name / verb / revision
        if self.path == "/api/repos/create":
            request = json.loads(body)
            hub.created.append(request)
            repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
            return self._reply({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": "0"})
        if self.path == "/api/validate-yaml":
            return self._reply({"errors": [], "warnings": []})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                           "oid": None} for f in files]})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            oid = f"{len(hub.commits) + 1:040x}"
            hub.commits.append({"repo_id": f"{parts[2]}/{parts[3]}", "revision": parts[5],
                                "summary": lines[0]["value"]["summary"], "files": files,
                                "other": [line for line in lines[1:] if line["key"] != "file"]})
            return self._reply({"commitUrl": f"{hub.url}/{parts[2]}/{parts[3]}/commit/{oid}", "commitOid": oid,
                                "pullRequestUrl": None})
        hub.unexpected.append(("POST", self.path))
        self._reply({"error": "not in the stand-in"}, 404)


@pytest.fixture
def hub():
    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A full output folder: model, processor, code files, config, metrics, pictures, and training leftovers."""
    output_dir = make_output_dir(tmp_path_factory.mktemp("saved") / "run", model=True)
    (output_dir / "optimizer.bin").write_bytes(b"optimizer state")
    (output_dir / "checkpoint-500").mkdir()
    (output_dir / "checkpoint-500" / "model.safetensors").write_bytes(b"old weights")
    return output_dir


def test_push_output_dir_commits_model_card_code_and_pictures(hub, saved_run, tmp_path):
    code = ("from hub_cards import push_output_dir; import sys; "
            "info = push_output_dir(sys.argv[1], 'someone/detr-shapes', private=True); print(info.oid)")
    result = run_python(["-c", code, str(saved_run)], clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_write"))
    assert result.returncode == 0, result.stderr
    assert hub.unexpected == []
    assert hub.created == [{"name": "detr-shapes", "organization": "someone", "visibility": "private"}]
    assert hub.auth == {"Bearer hf_write"}
    (commit,) = hub.commits
    assert result.stdout.strip().endswith(f"{1:040x}")
    assert commit["repo_id"] == "someone/detr-shapes" and commit["revision"] == "main" and commit["other"] == []

    committed = set(commit["files"])
    expected = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "metrics.json",
                *CODE_FILES, *PICTURES}
    assert expected <= committed
    assert {p for p in committed if p.endswith(".py")} == CODE_FILES  # testing_utils.py stays home
    assert "optimizer.bin" not in committed and not any(p.startswith("checkpoint-") for p in committed)
    for name in ("model.safetensors", "config.json", "loss_curve.png"):
        assert commit["files"][name] == (saved_run / name).read_bytes()
    card = ModelCard(commit["files"]["README.md"].decode())
    assert 'pipeline("object-detection", model="someone/detr-shapes", trust_remote_code=True)' in card.text
    assert "- `model.safetensors`: weights" in card.text
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {r.metric_type: r.metric_value for r in results}["map"] == fixture_metrics()["best"]["AP"]


def test_push_cli_and_token_verification(hub, saved_run, tmp_path):
    last = fixture_metrics()["eval_history"][-1]
    result = run_python(["-m", "hub_cards.push", str(saved_run), "detr-cli", "--eval-step", str(last["step"])],
                        clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_write"))
    assert result.returncode == 0, result.stderr
    assert f"{hub.url}/user/detr-cli/commit/" in result.stdout
    assert hub.created == [{"name": "detr-cli", "organization": None, "visibility": "public"}]  # no --private
    (commit,) = hub.commits
    assert commit["repo_id"] == "user/detr-cli"  # "name" resolved to the token's namespace
    card = ModelCard(commit["files"]["README.md"].decode())
    assert 'model="user/detr-cli"' in card.text  # the card names the resolved repository
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {r.metric_type: r.metric_value for r in results}["map"] == last["AP"]  # the folder's own evaluation

    verify = "from hub_cards import check_hub_token; check_hub_token(verify=True); print('ok')"
    good = run_python(["-c", verify], clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_write"))
    assert good.returncode == 0 and good.stdout.strip() == "ok", good.stderr
    read_only = run_python(["-c", verify], clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_read"))
    assert read_only.returncode != 0 and "read-only" in read_only.stderr
    assert hub.unexpected == []


def test_push_refuses_what_it_cannot_push_and_keeps_the_card_on_request(hub, saved_run, tmp_path):
    with pytest.raises(ValueError, match="needs a repository name"):
        push_output_dir(saved_run, "")
    (tmp_path / "empty").mkdir()
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_write")
    empty = run_python(["-m", "hub_cards.push", str(tmp_path / "empty"), "someone/detr-empty"], env)
    assert empty.returncode != 0 and "has no config.json" in empty.stderr
    assert hub.created == [] and hub.commits == []  # refused before the repository is created

    output_dir = shutil.copytree(saved_run, tmp_path / "run")
    (output_dir / "README.md").write_text("# written by hand\n", encoding="utf-8")
    kept = run_python(["-m", "hub_cards.push", str(output_dir), "someone/detr-kept", "--keep-card"], env)
    assert kept.returncode == 0, kept.stderr
    (commit,) = hub.commits
    assert commit["files"]["README.md"] == b"# written by hand\n"
    assert (output_dir / "README.md").read_text(encoding="utf-8") == "# written by hand\n"
    assert hub.unexpected == []


def test_recipe_reports_the_time_budget_and_the_precision_that_ran():
    from hub_cards.card_text import describe_recipe

    run = {"mixed_precision": "bf16", "mixed_precision_used": "no", "wall_time_s": 557.0,
           "budget": {"minutes": 9, "seconds_per_step": 0.3908, "eval_seconds": 1.265, "total_steps": 1361,
                      "upper_bound": 1900}}
    lines = dict(describe_recipe(run, {}, None))
    assert lines["Time budget"] == "9 min: 0.39 s/step and 1.3 s per evaluation measured, 1361 of at most 1900 steps"
    assert lines["Precision used"] == "no (bf16 asked; bf16 is emulated on this CPU)"
    plain = dict(describe_recipe({"mixed_precision": "no", "mixed_precision_used": "no", "budget": None}, {}, None))
    assert "Time budget" not in plain and "Precision used" not in plain


def test_recipe_states_the_duplicate_removal_of_the_folders_processor(tmp_path):
    from hub_cards.card_text import describe_post_processing

    assert describe_post_processing(tmp_path, {}) == []
    assert "IoU 0.7" in dict(describe_post_processing(tmp_path, {"nms_iou_threshold": 0.7}))["Post-processing"]
    # the folder's processor file is the truth: a user may have changed it after the run
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"nms_iou_threshold": 0.5}))
    assert "IoU 0.5" in dict(describe_post_processing(tmp_path, {"nms_iou_threshold": 0.7}))["Post-processing"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"nms_iou_threshold": None}))
    assert describe_post_processing(tmp_path, {"nms_iou_threshold": 0.7}) == []


def test_recipe_names_the_local_backbone_file_the_levers_and_an_early_stop():
    from hub_cards.card_text import describe_recipe

    config = {"backbone_weights": "/home/me/weights/mobilenet_v2-b0353104.pth",
              "backbone_weights_sha256": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
              "classification_loss": "varifocal", "num_query_groups": 13, "num_queries": 10}
    run = {"budget": {"minutes": 9, "seconds_per_step": 0.4, "eval_seconds": 1.0, "total_steps": 1300,
                      "upper_bound": 1900, "stopped_early_at": 1250}}
    lines = dict(describe_recipe(run, config, None))
    assert lines["Initialized from"].endswith("backbone from the local weights file `mobilenet_v2-b0353104.pth` "
                                              "(sha256 b03531047ffa…)")
    assert "/home/me" not in str(lines)                       # no local paths in a card that goes to the Hub
    assert lines["Class loss"].startswith("varifocal (RT-DETR)")
    assert lines["Query groups"].startswith("13 groups of 10 queries at training")
    assert lines["Time budget"].endswith("1300 of at most 1900 steps; stopped at step 1250 by its deadline (the steps "
                                         "ran slower than measured)")
    plain = dict(describe_recipe({}, {"classification_loss": "cross_entropy", "num_query_groups": 1}, None))
    assert "Class loss" not in plain and "Query groups" not in plain
    hybrid = dict(describe_recipe({}, {**config, "num_query_groups": 3, "criterion": "hybrid",
                                       "one_to_many_repeats": 4}, None))
    assert hybrid["Query groups"] == ("hybrid matching at training (H-DETR): 3 groups of 10 queries, the first "
                                      "matched one-to-one, the other 2 one-to-many to every object repeated up to 4 "
                                      "times; one group at inference")
    assert plain["Initialized from"] == "no checkpoint: every weight started random"


def test_card_says_which_design_an_rt_detr_model_is():
    from hub_cards.card_text import describe_design

    from modeling_detr_custom.checkpoint_conversion_rt_detr import convert_rt_detr_config

    rt_detr = convert_rt_detr_config({"backbone_config": {"model_type": "rt_detr_resnet", "layer_type": "basic",
                                                          "depths": [2, 2, 2, 2]}}).to_dict()
    text = describe_design(rt_detr)
    for part in ("deformable decoder", "3 feature levels", "hybrid encoder", "top 300 encoder proposals",
                 "100 denoising queries", "RT-DETR's exact layout", "IoU-aware varifocal"):
        assert part in text, (part, text)
    deformable = DetrCustomConfig.from_preset("deformable").to_dict()
    assert "learned reference boxes" in describe_design(deformable) and "focal loss" in describe_design(deformable)
    assert "on the coarsest level" in describe_design(deformable)
    encoder = DetrCustomConfig.from_preset("deformable", encoder_type="deformable").to_dict()
    assert "Deformable DETR's encoder (deformable attention over every level)" in describe_design(encoder)


# ---------------------------------------------------------------- the card's statements against the model


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def card_facts(text: str) -> dict:
    """The statements the card makes about the model's outputs, parsed back from its text."""
    logits = re.search(r"# logits \[1, (\d+), (\d+)\], pred_boxes \[1, (\d+), 4\]", text)
    limits = {int(n) for n in re.findall(r"[Aa]t most (\d+) detections", text)}
    head = re.search(r"The class head has (\d+) outputs", text)
    return {"queries": int(logits[1]), "class_outputs": int(logits[2]), "box_queries": int(logits[3]),
            "limits": limits, "head": int(head[1])}


def saved_model(path: Path, run: dict, *, loss: str, weights_file: Path | None = None, num_queries: int = 10,
                eval_entry: dict | None = None) -> tuple[Path, DetrCustomForObjectDetection]:
    """An output folder as train.py leaves it: the model and processor saved, metrics.json with `run`."""
    config = DetrCustomConfig(**tiny_kwargs(
        backbone="resnet18", id2label=ID2LABEL, classification_loss=loss, num_queries=num_queries,
        **({"backbone_weights": str(weights_file)} if weights_file else {})))
    model = DetrCustomForObjectDetection(config).eval()
    model.save_pretrained(path)
    DetrCustomImageProcessor(class_activation="sigmoid" if loss != "cross_entropy" else "softmax",
                             size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(path)
    entry = eval_entry or {"step": 40, "epoch": 4.0, "AP": 0.25, "AP50": 0.5, "AP_small": 0.1, "AP_medium": 0.3,
                           "AP_large": -1.0}
    metrics = {"run": run, "train_history": [{"step": 40, "loss": 3.0}], "eval_history": [entry], "best": entry}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path, model


def run_card_code(card_text: str, workdir: Path, monkeypatch) -> dict:
    """Runs every Python block of the card, as written, next to an image.jpg; returns the last block's names."""
    Image.new("RGB", (80, 64), (40, 120, 200)).save(workdir / "image.jpg")
    monkeypatch.chdir(workdir)
    namespace = {}
    for block in python_blocks(card_text):
        namespace = {}
        exec(compile(block, "<model card>", "exec"), namespace)
    return namespace


STEP_SIZED = {"model_name_or_path": None, "dataset": "data/shapes", "dataset_id": None, "train_images": 16,
              "val_images": 8, "num_train_epochs": 10.0, "max_steps": 40, "global_steps": 40, "budget": None}


@pytest.mark.parametrize("loss", ["cross_entropy", "focal", "varifocal"])
def test_card_states_the_head_the_outputs_and_the_detection_limit_the_model_has(tmp_path, monkeypatch, loss):
    output_dir, model = saved_model(tmp_path / "run", STEP_SIZED, loss=loss, num_queries=30)
    text = render_model_card(output_dir).text
    facts = card_facts(text)

    namespace = run_card_code(text, tmp_path, monkeypatch)     # the Auto-class block ran: its outputs are the model's
    outputs, results = namespace["outputs"], namespace["results"]
    assert list(outputs.logits.shape) == [1, facts["queries"], facts["class_outputs"]]
    assert list(outputs.pred_boxes.shape) == [1, facts["box_queries"], 4]
    assert facts["head"] == model.config.num_labels + (0 if loss != "cross_entropy" else 1) == facts["class_outputs"]
    processor = namespace["processor"]
    everything = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(64, 80)])[0]
    assert facts["limits"] == {len(everything["scores"])}                 # one limit, the one post-processing has
    assert len(results["scores"]) <= len(everything["scores"])
    if loss == "cross_entropy":
        assert facts["limits"] == {30} and 'then "no object"' in text and "one sigmoid per class" not in text
    else:
        assert facts["limits"] == {min(100, 30 * 3)} and '"no object" (the last one)' not in text
        assert "one sigmoid per class" in text and "no 'no object' output" in text


def test_card_limit_is_post_processing_top_k():
    from hub_cards.card_text import SIGMOID_LOSSES, SIGMOID_TOP_K

    from modeling_detr_custom.configuration_detr_custom import SIGMOID_CLASSIFICATION_LOSSES
    from modeling_detr_custom.image_processing_detr_custom import SIGMOID_TOP_K as PROCESSOR_TOP_K

    assert SIGMOID_TOP_K == PROCESSOR_TOP_K and set(SIGMOID_LOSSES) == set(SIGMOID_CLASSIFICATION_LOSSES)


def test_card_says_where_the_weights_started(tmp_path):
    import timm
    import torch

    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)

    scratch_dir, _ = saved_model(tmp_path / "scratch", STEP_SIZED, loss="focal")
    scratch = render_model_card(scratch_dir).text
    assert "trained from scratch (every weight started random)" in scratch
    assert "**Initialized from:** no checkpoint: every weight started random" in scratch

    file_dir, model = saved_model(tmp_path / "file", STEP_SIZED, loss="focal", weights_file=weights)
    expected = torch.load(weights)
    loaded = {k: v for k, v in model.model.backbone.body.state_dict().items() if k in expected}
    assert loaded and all(torch.equal(v, expected[k]) for k, v in loaded.items())   # the backbone is the file's
    started = render_model_card(file_dir).text
    assert "trained from scratch" not in started.replace("transformer and heads trained from scratch", "")
    assert "its backbone initialized from the local weights file `resnet18-imagenet.pth`" in started
    assert str(tmp_path) not in started.split("```python")[0]          # the file's name only, no local path

    tuned_dir, _ = saved_model(tmp_path / "tuned", {**STEP_SIZED, "model_name_or_path": "facebook/detr-resnet-50"},
                               loss="cross_entropy")
    tuned = render_model_card(tuned_dir)
    assert "fine-tuned from [facebook/detr-resnet-50]" in tuned.text and "from scratch" not in tuned.text
    assert tuned.data.base_model == "facebook/detr-resnet-50"


def test_card_length_is_steps_or_epochs_as_the_run_was_sized(tmp_path):
    from hub_cards.card_text import describe_recipe

    by_steps = dict(describe_recipe({**STEP_SIZED, "num_train_epochs": 3.6625}, {}, None))
    assert "Epochs" not in by_steps
    assert by_steps["Length"] == "40 optimizer steps (3.66 passes over the 16 training images), set by max_steps 40"
    budget = {"minutes": 9, "seconds_per_step": 0.5, "eval_seconds": 3.0, "total_steps": 1042, "upper_bound": 1900}
    by_budget = dict(describe_recipe({**STEP_SIZED, "max_steps": 1900, "global_steps": 1042, "num_train_epochs": 20.84,
                                      "train_images": 400, "budget": budget}, {}, None))
    assert by_budget["Length"] == ("1042 optimizer steps (20.8 passes over the 400 training images), set by the time "
                                   "budget below")
    by_epochs = dict(describe_recipe({"num_train_epochs": 30, "max_steps": None, "global_steps": 1500}, {}, None))
    assert by_epochs["Epochs"] == "30 (1500 optimizer steps)" and "Length" not in by_epochs


def test_card_names_the_hub_dataset_and_the_split_it_was_measured_on(tmp_path):
    run = {**STEP_SIZED, "dataset": "someone/shapes", "dataset_id": "someone/shapes", "train_split": "train",
           "val_split": "test"}
    output_dir, _ = saved_model(tmp_path / "run", run, loss="focal")
    card = render_model_card(output_dir)
    assert card.data.datasets == ["someone/shapes"]
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {(r.dataset_type, r.dataset_split) for r in results} == {("someone/shapes", "test")}
    assert "**Validation images:** 8 (split `test`)" in card.text
    assert "**Training images:** 16 (split `train`)" in card.text
    assert "on the 8 validation images (split `test`)" in card.text

    folder = {**STEP_SIZED, "dataset": "data/shapes"}
    folder_dir, _ = saved_model(tmp_path / "folder", folder, loss="focal")
    folder_card = render_model_card(folder_dir)     # "data/shapes" looks like a Hub id; the run says it is a folder
    assert folder_card.data.datasets is None and "split `" not in folder_card.text
    _, results = model_index_to_eval_results(folder_card.data.to_dict()["model-index"])
    assert {(r.dataset_type, r.dataset_split) for r in results} == {("custom", "validation")}


def test_card_of_a_real_run_matches_its_model(tmp_path, data_dir, monkeypatch):
    """A tiny training run (sigmoid head, backbone from a weights file, sized in steps): its best/ card's
    statements are the saved model's."""
    import timm
    import torch

    from tiny_run import run as train_run
    from tiny_run import write_config

    weights = tmp_path / "resnet18-start.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    config = write_config(tmp_path, data_dir, classification_loss="focal", class_cost=2.0,
                          class_loss_coefficient=2.0, backbone_weights=str(weights), max_steps=6, eval_steps=6,
                          max_train_minutes=0)
    train_run(config)
    best = tmp_path / "run" / "best"
    text = (best / "README.md").read_text(encoding="utf-8")
    facts = card_facts(text)
    model = DetrCustomForObjectDetection.from_pretrained(best)
    assert facts["class_outputs"] == facts["head"] == model.config.num_labels == len(model.config.id2label)
    assert facts["queries"] == model.config.num_queries
    assert facts["limits"] == {min(100, model.config.num_queries * model.config.num_labels)}
    assert "trained from scratch (every" not in text and "local weights file `resnet18-start.pth`" in text
    assert re.search(r"\*\*Length:\*\* 6 optimizer steps \([\d.]+ passes over the 16 training images\), set by "
                     r"max_steps 6", text)
    assert "Epochs:" not in text
    namespace = run_card_code(text, tmp_path, monkeypatch)
    assert list(namespace["outputs"].logits.shape) == [1, facts["queries"], facts["class_outputs"]]


def test_card_names_every_package_the_remote_code_imports(tmp_path):
    """"torch, transformers, timm, scipy and pillow are enough": every third-party module the travelling code
    imports is one of them or installed by transformers itself."""
    import ast
    import importlib.metadata
    import sys

    imported = set()
    for name in CODE_FILES:
        for node in ast.walk(ast.parse((ROOT / "modeling_detr_custom" / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    with_transformers = {re.split(r"[<>=~! ;\[]", requirement)[0].replace("-", "_").lower()
                         for requirement in importlib.metadata.requires("transformers")
                         if "extra ==" not in requirement}
    output_dir, _ = saved_model(tmp_path / "run", STEP_SIZED, loss="focal")
    text = render_model_card(output_dir).text
    named = re.search(r"`trust_remote_code=True`\); (.*?) are enough", text)[1]
    packages = {"PIL": "pillow"}
    needed = {packages.get(name, name) for name in third_party - with_transformers}
    missing = needed - set(re.split(r", | and ", named))
    assert not missing, f"the card's How to use does not name {missing}"


def test_card_of_a_run_on_a_saved_datasets_folder_names_its_split(tmp_path):
    """A cppe-5-like `save_to_disk` folder (splits train and test): the card names the split the figures come from
    and does not take the local folder for a Hub dataset."""
    import datasets

    from tiny_run import run as train_run
    from tiny_run import write_config

    def picture(x: int, y: int) -> dict:
        image = Image.new("RGB", (96, 80), (30, 30, 30))
        image.paste((220, 40, 40), (x, y, x + 30, y + 24))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    objects = {"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
               "category": datasets.ClassLabel(names=["box"])}
    features = datasets.Features({"image": datasets.Image(), "objects": datasets.Sequence(objects)})

    def split(corners: list) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "image": [picture(x, y) for x, y in corners],
            "objects": [{"bbox": [[x, y, 30, 24]], "category": [0]} for x, y in corners]}, features=features)

    saved = tmp_path / "shapes-hub"
    datasets.DatasetDict({"train": split([(5, 5), (40, 30), (20, 50), (60, 10)]),
                          "test": split([(10, 40), (50, 20)])}).save_to_disk(str(saved))
    config = write_config(tmp_path, None, dataset_name=str(saved), bbox_format="xywh", val_split="test",
                          max_steps=2, eval_steps=2, max_train_minutes=0)
    train_run(config)
    card = ModelCard.load(tmp_path / "run" / "last" / "README.md")
    assert card.data.datasets is None                        # a local folder, not a Hub dataset
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {r.dataset_split for r in results} == {"test"}
    assert "**Validation images:** 2 (split `test`)" in card.text
    assert "**Training images:** 4 (split `train`)" in card.text
