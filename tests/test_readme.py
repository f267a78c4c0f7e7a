"""The README and the user guides in docs/ say what runs.

- Every ```python block of README.md runs as written, offline, in a folder holding the embedded dataset
  (`data/demo`, as `make demo` writes it): only the model names are replaced, by tiny models built here
  (`outputs/demo/best` by a saved folder of ours, `facebook/detr-resnet-50` by a transformers DETR folder).
- Every command line they show (`python -m training.train`, `accelerate launch -m training.train`,
  `detr-custom-*`, `python -m MODULE`) parses with the command's real argument parser: each flag exists and takes
  the values shown. Commands are not run.
"""
import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import DetrConfig, DetrForObjectDetection

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.testing_utils import tiny_kwargs
from training.sample_data import write_sample_dataset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the user guides whose commands are checked with the README's (the other docs pages are checked by their owners)
GUIDES = [README] + [ROOT / "docs" / name for name in ("training.md", "conventions.md", "benchmarks.md")]
# console scripts (setup.cfg) -> the module whose main() they run
CONSOLE_SCRIPTS = {"detr-custom-train": "training.train", "detr-custom-predict": "deploy.predict",
                   "detr-custom-eval": "deploy.evaluate", "detr-custom-export": "deploy.export",
                   "detr-custom-convert": "modeling_detr_custom.convert"}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's folder after `make demo`: data/demo (a few images) and the models the README names, tiny."""
    root = tmp_path_factory.mktemp("user")
    write_sample_dataset(root / "data" / "demo", num_train=2, num_val=2, seed=0)
    ours = root / "tiny_ours"
    kwargs = tiny_kwargs(id2label={0: "circle", 1: "square", 2: "triangle", 3: "diamond", 4: "cross"},
                         num_feature_levels=2, num_queries=30)
    del kwargs["num_labels"]                                         # id2label gives them
    model = DetrCustomForObjectDetection(DetrCustomConfig.from_preset("deformable", **kwargs))
    with torch.no_grad():                                            # confident classes: the blocks print detections
        for name, parameter in model.named_parameters():
            if "class_embed" in name and name.endswith("bias"):
                parameter.fill_(4.0)
    model.save_pretrained(ours)                                      # the model first: the processor reads its head
    DetrCustomImageProcessor(size={"shortest_edge": 128, "longest_edge": 224}).save_pretrained(ours)
    DetrForObjectDetection(DetrConfig(**tiny_kwargs())).save_pretrained(root / "tiny_transformers_detr")
    return root


def substituted(block: str, workdir: Path) -> str:
    models = {"outputs/demo/best": workdir / "tiny_ours",
              "facebook/detr-resnet-50": workdir / "tiny_transformers_detr"}
    for name in re.findall(r'from_pretrained\("([^"]+)"|model="([^"]+)"', block):
        name = next(part for part in name if part)
        assert name in models, f"the README loads {name!r}: add a tiny stand-in for it to this test"
    for name, path in models.items():
        block = block.replace(f'"{name}"', f'"{path}"')
    return block


def test_readme_python_blocks_run_as_written(workdir, monkeypatch):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    monkeypatch.chdir(workdir)                            # the README's relative paths: data/demo/...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for index, block in enumerate(blocks):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(substituted(block, workdir), f"README.md python block {index + 1}", "exec"), {})
        assert printed.getvalue().strip(), f"README python block {index + 1} printed nothing:\n{block}"


# ---------------------------------------------------------------- command lines


def command_lines(markdown: str) -> list[str]:
    """The command lines of shell blocks (continuations joined, comments dropped) and of inline code spans."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line)
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    lines += [span for span in re.findall(r"`([^`\n]+)`", text.replace("\n", " "))]
    commands = []
    for line in lines:
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if re.match(r"^(accelerate launch .*-m training\.train|python -m [\w.]+|detr-custom-\w+)(\s|$)", line):
            commands.append(line)
    return commands


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def real_parser(module_name: str) -> argparse.ArgumentParser:
    """The parser `module.main` builds, taken when it first parses (nothing after it runs)."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = capture
    try:
        module.main([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{module_name}.main did not parse any arguments")


def split_command(line: str) -> tuple[str, list[str]]:
    tokens = shlex.split(re.sub(r"[\[\]]", " ", line))   # a synopsis's optional parts ([--private]) are parsed too
    if tokens[0] == "accelerate":
        tokens = tokens[tokens.index("-m") + 1:]
        return tokens[0], tokens[1:]
    if tokens[0] == "python":
        return tokens[2], tokens[3:]
    return CONSOLE_SCRIPTS[tokens[0]], tokens[1:]


def accelerate_parser() -> argparse.ArgumentParser:
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


def check_command(line: str, source: str) -> None:
    if line.startswith("accelerate launch"):          # the launcher's own flags, before -m
        tokens = shlex.split(line)
        launcher = [token for token in tokens[2:tokens.index("-m")] if token.startswith("--")]
        unknown = [flag for flag in launcher if flag not in accelerate_parser()._option_string_actions]
        assert not unknown, f"{source}: `{line}`: {unknown} are not flags of accelerate launch"
    module, argv = split_command(line)
    parser = real_parser(module)
    if "--config" in argv:                              # training.train reads it before its parser runs
        index = argv.index("--config")
        assert (ROOT / argv[index + 1]).is_file() or argv[index + 1] == "...", f"{source}: {line}: no such config"
        argv = argv[:index] + argv[index + 2:]
    flags = [token.split("=")[0] for token in argv if token.startswith("--")]
    unknown = [flag for flag in flags if flag not in parser._option_string_actions]
    assert not unknown, f"{source}: `{line}`: {unknown} are not flags of {module}"
    if "--help" in argv or "..." in argv or not argv:   # a placeholder or a bare command: the flags are enough
        return
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            parsed, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{source}: `{line}` does not parse: {errors.getvalue()}")
    assert not extra, f"{source}: `{line}`: {module} does not take {extra}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_command_lines_use_real_flags(guide):
    commands = command_lines(guide.read_text(encoding="utf-8"))
    if guide == README:
        assert any("training.train" in line for line in commands)
        assert {"detr-custom-predict", "detr-custom-eval", "detr-custom-export"} <= {
            line.split()[0] for line in commands}
    for line in commands:
        check_command(line, guide.name)


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_flags_named_in_the_text_exist(guide):
    """A flag quoted on its own (`--max_train_minutes 30`) is a flag of one of the commands the page shows."""
    text = guide.read_text(encoding="utf-8")
    modules = {split_command(line)[0] for line in command_lines(text)} | {"training.train"}
    known = set().union(*(real_parser(module)._option_string_actions for module in sorted(modules)),
                        accelerate_parser()._option_string_actions)
    quoted = set(re.findall(r"`(--[\w-]+)", re.sub(r"```.*?```", "", text, flags=re.S)))
    assert not quoted - known, f"{guide.name} names {sorted(quoted - known)}: no command it shows has them"


def test_the_flag_check_catches_a_flag_that_does_not_exist():
    with pytest.raises(AssertionError, match="--learning_rates"):
        check_command("python -m training.train --config training/configs/demo.yaml --learning_rates 1e-4", "test")
    with pytest.raises(AssertionError, match="--out"):
        check_command("detr-custom-predict outputs/demo/best images/ --out predictions", "test")
    with pytest.raises(AssertionError, match="--multi_gpus"):
        check_command("accelerate launch --multi_gpus -m training.train --config training/configs/demo.yaml", "test")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command("detr-custom-export outputs/demo/best --format tflite --output x", "test")


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_guides_speak_of_the_product(guide):
    """A user's guide: the README fits in 300 lines; no page cites this project's issues."""
    text = guide.read_text(encoding="utf-8")
    if guide == README:
        assert len(text.splitlines()) <= 300
    assert not re.search(r"\bissues? \d+|(?<![\w/-])#\d+", text, flags=re.I), f"{guide.name} cites an issue"
