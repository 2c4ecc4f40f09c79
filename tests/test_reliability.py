"""Faults tried on purpose: saves cut at every step, preemption signals, resumes that must really resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import COUNTED_TRAIN, DOMAINS, counted_steps, python_path, requires_faiss, torch_encoder, workspace_of
from safetensors import safe_open
from test_train import run_train

from configuration_moebert import MoEBertConfig
from modeling_moebert import MoEBertModel
from moebert.atomic import recover_folder, replace_folder
from moebert.training.recipes import RECIPES
from moebert.training.state import CheckpointError, TrainingState
from moebert.training.workspace import Workspace, check_fits, save_model
import train

# ------------------------------------------------------------------------------------------------ whole-folder saves


def model_files(folder):
    """{relative path: content} of every file of a model folder (safetensors files by their tensors and metadata:
    the header's key order varies from one write to the next)."""
    listed = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def content(path):
        if path.suffix != ".safetensors":
            return path.read_bytes()
        with safe_open(path, framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}

    return {name: content(folder / name) for name in listed}


def test_a_save_cut_at_any_point_leaves_the_old_model_or_the_new_one(tiny_bert, tmp_path, monkeypatch):
    old_model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)
    old_model.add_domain("ONC", tokenizer)  # the old model has an expert file the new one lacks
    new_model = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)[0]
    with torch.no_grad():
        new_model.encoder.layer[0].experts[0].output.weight.add_(1.0)
    folder, rmtree, replace, link = tmp_path / "out", shutil.rmtree, os.replace, os.link

    def old_folder():
        for name in ("out", ".tmp-out", ".old-out"):
            rmtree(tmp_path / name, ignore_errors=True)
        save_model(old_model, tokenizer, folder, state(1))
        return model_files(folder)

    new = model_files(_saved(new_model, tokenizer, tmp_path / "reference", state(2)))
    old = old_folder()
    assert "experts/ONC.safetensors" in old and "experts/ONC.safetensors" not in new

    calls = {"n": 0, "fail_at": 0}

    def failing(function):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise SimulatedKill(f"at file operation {calls['n']}")
            return function(*args, **kwargs)
        return wrapper

    outcomes = []
    for fail_at in range(1, 200):
        old_folder()
        calls.update(n=0, fail_at=fail_at)
        with monkeypatch.context() as patch:
            for module, name, function in ((os, "replace", replace), (os, "link", link), (shutil, "rmtree", rmtree)):
                patch.setattr(module, name, failing(function))
            try:
                save_model(new_model, tokenizer, folder, state(2))
                finished = True
            except SimulatedKill:
                finished = False
        recover_folder(folder)  # what the next save or run does first
        held = model_files(folder)
        assert held in (old, new), f"a mix after a kill at file operation {fail_at}"
        outcomes.append("new" if held == new else "old")
        if finished:
            break
    assert finished and outcomes[-1] == "new" and "old" in outcomes and outcomes.count("new") > 1, outcomes


def test_a_folder_swap_finishes_or_clears_what_a_kill_left_beside_the_folder(tmp_path):
    final, moved_aside = tmp_path / "out", tmp_path / ".old-out"

    def folder(path, text):
        path.mkdir()
        (path / "weights").write_text(text)
        return path

    def left():
        return sorted(p.name for p in tmp_path.iterdir())

    folder(final, "a")
    assert recover_folder(final) is False and recover_folder(tmp_path / "never-written") is False  # nothing to finish
    folder(moved_aside, "stale")  # killed after the second rename, before the copy moved aside was deleted
    replace_folder(folder(tmp_path / "new", "b"), final)
    assert (final / "weights").read_text() == "b" and left() == ["out"]
    os.replace(final, moved_aside)  # moved aside, and the new folder lost: the old one goes back
    assert recover_folder(final) is True and (final / "weights").read_text() == "b" and left() == ["out"]


def test_the_workspace_holds_every_folder_a_run_keeps_beside_the_model(tmp_path):
    config = MoEBertConfig(domains=["A", "B"])
    beside = Workspace(tmp_path / "out")
    assert (beside.output_dir, beside.root) == (tmp_path / "out", tmp_path / "out-workspace")
    assert [p.relative_to(beside.root).as_posix() for p in (beside.best_model_dir, beside.stem_states_dir,
            beside.staging_dir, beside.logs_dir, beside.checkpoint_dir(7))] == [
        "best_model", "stem-states", "hub-uploads", "logs", "checkpoint-7"]  # the layout docs/training.md shows
    chosen = Workspace(tmp_path / "out", workspace_dir=tmp_path / "w", stem_states_dir=tmp_path / "shared-stems")
    assert (chosen.root, chosen.best_model_dir, chosen.stem_states_dir) == (
        tmp_path / "w", tmp_path / "w" / "best_model", tmp_path / "shared-stems")

    assert beside.checkpoints() == [] and beside.resume_path("latest") is None
    for step in (9, 10, 2):
        beside.checkpoint_dir(step).mkdir(parents=True)
    (beside.root / "checkpoint-11").write_text("a file")  # neither a stray file nor another name is a checkpoint
    (beside.root / "checkpoint-final").mkdir()
    (beside.root / ".tmp-checkpoint-12").mkdir()  # one being written
    assert [p.name for p in beside.checkpoints()] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert beside.resume_path("latest") == beside.checkpoint_dir(10)
    assert beside.resume_path(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
    with pytest.raises(CheckpointError, match=r"another model \(domains: checkpoint \['A'\], this run \['A', 'B'\]; "
                                              r"num_experts: checkpoint 1, this run 2\)"):
        check_fits(beside.checkpoint_dir(2), {**config.to_dict(), "domains": ["A"], "num_experts": 1}, config)


def test_a_checkpoint_holds_only_what_this_run_wrote_and_the_oldest_go_past_the_limit(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "out"
    stale = workspace_of(out) / ".tmp-checkpoint-3" / "left-by-a-killed-write"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    run_train(tiny_bert, tiny_data, out, "--max_train_steps", "3", "--checkpointing_steps", "1",
              "--checkpoints_total_limit", "2")
    assert [p.name for p in Workspace(out).checkpoints()] == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in workspace_of(out).rglob("left-by-a-killed-write")]


class SimulatedKill(BaseException):
    """Stops the save where it is, like a kill: no `except Exception` on the way catches it."""


def state(step: int) -> TrainingState:
    return TrainingState(DOMAINS, {}, {"output_dir": "out"}, {}, step)


def _saved(model, tokenizer, folder, state):
    save_model(model, tokenizer, folder, state)
    return folder


def test_a_save_leaves_exactly_the_new_models_files(tiny_bert, tmp_path):
    old_model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)  # with experts/<DOMAIN>.safetensors
    new_model = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS, num_experts=1)[0]  # one shared expert: no experts/
    folder = tmp_path / "out"
    save_model(old_model, tokenizer, folder, state(1))
    save_model(new_model, MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)[1], folder, state(1))
    reference = _saved(new_model, MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)[1], tmp_path / "reference", state(1))

    def files(where):
        return sorted(str(p.relative_to(where)) for p in where.rglob("*") if p.is_file())

    assert files(folder) == files(reference)
    assert {"config.json", "model.safetensors", "README.md", "training_state.json"} <= set(files(folder))
    assert not (folder / "experts").exists()


def test_a_run_started_after_a_kill_between_the_renames_of_a_save_finishes_that_save_first(tiny_bert, tiny_data,
                                                                                          tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    steps = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "0"]
    run_train(tiny_bert, tiny_data, out, "--max_train_steps", "1", *steps)
    replace = os.replace

    def killed_between_the_renames(source, target):
        replace(source, target)
        if Path(target).name == ".old-out":  # the old model is aside; the new one is not in place yet
            raise SimulatedKill("between the two renames of the final save")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_between_the_renames)
        with pytest.raises(SimulatedKill):
            run_train(tiny_bert, tiny_data, out, "--max_train_steps", "2", *steps, "--resume_from_checkpoint", "latest")
    assert not out.exists() and (tmp_path / ".tmp-out" / "model.safetensors").is_file()
    saved = load_file(tmp_path / ".tmp-out" / "model.safetensors")
    capsys.readouterr()

    class Stop(Exception):
        pass

    def fail(*args):
        raise Stop

    monkeypatch.setattr(train, "train", fail)  # the next run fails right away: the save was finished before that
    with pytest.raises(Stop):
        run_train(tiny_bert, tiny_data, out, "--max_train_steps", "2", *steps, "--resume_from_checkpoint", "latest")
    assert f"{out}: finished the model save a kill had interrupted" in capsys.readouterr().out
    for key, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, saved[key], atol=0, rtol=0, msg=key)
    assert not [p.name for p in tmp_path.rglob("*") if p.name.startswith((".tmp", ".old"))]


# ------------------------------------------------------------------------------------------------ preemption


def start_training(tiny_bert, data, output_dir, *extra, env=None):
    """train.py in a subprocess (counted_train.py: its optimizer steps go to OUTPUT_DIR.steps.0), output streamed."""
    command = [sys.executable, str(COUNTED_TRAIN), "--recipe", "quick", "--model_name_or_path", tiny_bert, "--dataset",
               f"CVD={data / 'CVD'}", "--dataset", f"COPD={data / 'COPD'}", "--output_dir", str(output_dir),
               "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--seed", "3", "--max_train_steps",
               "100000", "--eval_steps", "0", *extra]
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "COUNTED_STEPS": str(steps_record(output_dir))} | (env or {})
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    streams = {"out": "", "err": ""}

    def read(name, stream):  # whatever arrives (progress bars end their updates with \r, not \n)
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            streams[name] += chunk.decode(errors="replace")

    for name, stream in (("out", process.stdout), ("err", process.stderr)):
        threading.Thread(target=read, args=(name, stream), daemon=True).start()
    return process, streams


def steps_record(output_dir: Path) -> Path:
    return output_dir.with_name(f"{output_dir.name}.steps")


def wait_for(streams, name, text, process, timeout=120):
    deadline = time.time() + timeout
    while text not in streams[name] and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert text in streams[name], streams["err"][-3000:]


def stopped_line(streams) -> str:
    time.sleep(0.2)  # the reader threads drain the pipes
    stopped = [line for line in streams["out"].splitlines() if line.startswith("stopped by")]
    assert stopped, streams["err"][-3000:]
    return stopped[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_training_after_the_step_with_a_checkpoint_to_resume_from(tiny_bert, tiny_data, tmp_path, signum,
                                                                                optimizer_steps):
    warmup = 10_000  # --max_train_steps 100000: the learning rate climbs by rate / 10000 a step throughout
    rate = RECIPES["quick"]["learning_rate"]
    out = tmp_path / "out"
    process, streams = start_training(tiny_bert, tiny_data, out)
    wait_for(streams, "err", "training:", process)  # the loop has started
    time.sleep(0.5)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    stopped = stopped_line(streams)
    step = int(stopped.split("after step ")[1].split(":")[0])
    assert step > 0 and f"checkpoint in {workspace_of(out) / f'checkpoint-{step}'}" in stopped
    assert stopped.rstrip().endswith("--resume_from_checkpoint latest")
    taken = counted_steps(steps_record(out))  # it stopped right after the step it names
    assert taken == pytest.approx([rate * k / warmup for k in range(step)], rel=1e-6, abs=1e-15)
    assert (workspace_of(out) / f"checkpoint-{step}" / "model" / "config.json").is_file() and not out.exists()
    optimizer_steps.stop_after = 2  # this process signals itself after two steps of the resumed run
    with pytest.raises(SystemExit, match=f"^{128 + signal.SIGTERM}$"):
        run_train(tiny_bert, tiny_data, out, "--max_train_steps", "100000", "--eval_steps", "0",
                  "--resume_from_checkpoint", "latest")
    # the checkpoint's step, schedule and weights went on: the next two steps at the uninterrupted run's rates
    assert optimizer_steps == pytest.approx([rate * k / warmup for k in (step, step + 1)], rel=1e-6)
    assert (workspace_of(out) / f"checkpoint-{step + 2}" / "model" / "model.safetensors").is_file()


def test_a_second_signal_exits_at_once_and_the_checkpoints_before_survive(tiny_bert, tiny_data, tmp_path,
                                                                          optimizer_steps):
    out = tmp_path / "out"
    process, streams = start_training(tiny_bert, tiny_data, out, "--checkpointing_steps", "1",
                                      "--checkpoints_total_limit", "0")
    wait_for(streams, "err", "training:", process)
    while not Workspace(out).checkpoints() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    wait_for(streams, "err", "SIGTERM: stopping after this step", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # killed by the signal itself, no clean-up
    assert "stopped by" not in streams["out"]
    kept = [int(p.name.split("-")[1]) for p in Workspace(out).checkpoints()]
    assert kept and kept == list(range(1, kept[-1] + 1))  # every checkpoint written before, complete
    for step in kept:
        assert TrainingState.load(workspace_of(out) / f"checkpoint-{step}" / "model").step == step
    card = run_train(tiny_bert, tiny_data, out, "--max_train_steps", str(kept[-1] + 1), "--eval_steps", "0",
                     "--resume_from_checkpoint", "latest")
    assert card.step == kept[-1] + 1 and len(optimizer_steps) == 1


SIGNALLED_BEFORE_OR_AFTER_ARMING = """
import os, signal, sys, time
from accelerate import PartialState
from moebert.training.preemption import StopRequest
PartialState()  # the log line of a stop goes through accelerate
stop = StopRequest()
if sys.argv[1] == "training":
    stop.arm()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print("asked to stop" if stop.signum else "not asked")
"""


@pytest.mark.parametrize("when", ["setting up", "training"])
def test_a_signal_before_the_first_step_exits_at_once(when):
    """Before training steps (stored stem states of a large base take minutes) nothing is there to checkpoint: a
    Ctrl-C or SIGTERM ends the run at once rather than after the first step."""
    done = subprocess.run([sys.executable, "-c", SIGNALLED_BEFORE_OR_AFTER_ARMING, when], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": python_path()}, timeout=120)
    if when == "setting up":
        assert done.returncode == -signal.SIGTERM and done.stdout == ""
    else:
        assert done.returncode == 0 and done.stdout.strip() == "asked to stop", done.stderr


def test_a_stop_waits_for_a_hanging_hub_upload_only_stop_timeout_seconds(tiny_bert, tiny_data, tmp_path):
    from fake_hub import FakeHub

    out = tmp_path / "out"
    with FakeHub(hang=90) as hub:  # every commit takes 90 s to answer: the network of a machine going away
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test", "HF_HOME": str(tmp_path / "hf")}
        process, streams = start_training(tiny_bert, tiny_data, out, "--checkpointing_steps", "1", "--push_to_hub",
                                          "--hub_model_id", "lab/moebert-test", "--stop_timeout", "2", env=env)
        while not Workspace(out).checkpoints() and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM  # long before the upload could answer
    assert "were still under way after 2 s and are abandoned; the local files are intact" in streams["err"]
    step = int(stopped_line(streams).split("after step ")[1].split(":")[0])
    assert (workspace_of(out) / f"checkpoint-{step}" / "model" / "model.safetensors").is_file()


def test_the_resume_command_keeps_every_flag_but_the_old_resume():
    argv = ["train.py", "--seed", "3", "--resume_from_checkpoint", "checkpoint-4", "--output_dir", "o"]
    assert train.resume_command(argv) == "python train.py --seed 3 --output_dir o --resume_from_checkpoint latest"
    assert train.resume_command(["train.py", "--resume_from_checkpoint=x"]) == "python train.py --resume_from_checkpoint latest"


# ------------------------------------------------------------------------------------------------ published files


def local_paths_in(folder, local_prefixes) -> list[str]:
    """Files under `folder` (json, jsonl, md, txt, and the metadata of safetensors files) that name a folder of this
    machine."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".txt"):
            text = path.read_text(errors="replace")
        elif path.is_file() and path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                text = json.dumps(f.metadata())
        else:
            continue
        found += [f"{path.relative_to(folder)}: {p}" for p in local_prefixes if p in text]
    return found


@requires_faiss
def test_a_model_upcycled_from_a_local_folder_names_no_base_wherever_it_goes(tiny_bert, tiny_data, tmp_path,
                                                                           monkeypatch):
    from moebert.__main__ import main as moebert_command
    from huggingface_hub import ModelCard

    import eval as eval_script

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the base's folder is neither the working directory nor below it
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
    model.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    model.save_expert("CVD", tmp_path / "start" / "experts" / "CVD.safetensors")
    model.add_domain("ONC", tokenizer, init_from="CVD")
    model.save_expert("ONC", tmp_path / "ONC.safetensors")
    out = tmp_path / "out"
    run_train(str(tmp_path / "start"), tiny_data, out, "--max_train_steps", "1", "--stem_cache_dir",
              str(tmp_path / "stems"))
    trained, trained_tokenizer = MoEBertModel.from_pretrained(out), None
    from transformers import AutoTokenizer

    trained_tokenizer = AutoTokenizer.from_pretrained(out)
    trained.load_expert(tmp_path / "ONC.safetensors", tokenizer=trained_tokenizer)
    trained.save_pretrained(tmp_path / "grown")
    trained.save_expert("ONC", tmp_path / "grown" / "experts" / "ONC.safetensors")
    eval_script.main(["calibrate", "--model", str(out), "--dataset", f"CVD={tiny_data / 'CVD'}", "--max_seq_length",
                     "32", "--device", "cpu"])
    moebert_command(["export", "--model", str(out), "--output_dir", str(tmp_path / "export"), "--quantize", "none"])
    local = [str(tmp_path), str(Path(tiny_bert).resolve()), str(Path.home()), sys.prefix]
    for folder in ("start", "out", "grown", "export"):
        assert not local_paths_in(tmp_path / folder, local), local_paths_in(tmp_path / folder, local)
    assert not local_paths_in(tmp_path, [str(Path(tiny_bert).resolve())])  # the ONC expert file too
    # the folder's name would pass for a Hub id (or a relative path) that is not there: no base is named at all
    assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] is None
    assert ModelCard.load(out / "README.md").data.base_model is None
    assert "base_model_name_or_path" not in safe_open(out / "experts" / "CVD.safetensors", framework="pt").metadata()


def test_the_embedded_base_is_published_by_its_hub_id_or_by_nothing_whichever_way_the_model_was_made(minilm, tmp_path,
                                                                                                    monkeypatch):
    from huggingface_hub import ModelCard

    from moebert.__main__ import main as moebert_command
    from moebert.models.builder import build_model
    from moebert.names import DEFAULT_BASE_MODEL_ID

    monkeypatch.chdir(tmp_path)

    def published_bases(folder) -> set:
        names = {json.loads((folder / "config.json").read_text())["base_model_name_or_path"]}
        names |= {safe_open(f, framework="pt").metadata().get("base_model_name_or_path")
                  for f in (folder / "experts").glob("*.safetensors")}
        if (folder / "README.md").is_file():
            names.add(ModelCard.load(folder / "README.md").data.base_model)
        return names

    model, tokenizer = MoEBertModel.from_bert(minilm, domains=["CVD"], moe_layers="top2")  # by hand, from its folder
    model.save_pretrained(tmp_path / "by-hand")
    model.save_experts(tmp_path / "by-hand" / "experts")
    assert published_bases(tmp_path / "by-hand") == {None}  # never "model", the folder's last name
    model.save_expert("CVD", tmp_path / "CVD.safetensors")
    for base in (minilm, DEFAULT_BASE_MODEL_ID):  # the library knows the folder for the Hub id it ships
        built, _ = build_model(base, ["CVD"], moe_layers="top2")
        assert built.config.base_model_name_or_path == DEFAULT_BASE_MODEL_ID and built.config.max_seq_length == 256
        composed = tmp_path / f"composed-{len(base)}"
        moebert_command(["compose", "--base", base, "--expert", str(tmp_path / "CVD.safetensors"), "--output_dir",
                         str(composed)])
        assert published_bases(composed) == {DEFAULT_BASE_MODEL_ID}


@requires_faiss
def test_no_published_file_names_a_folder_of_this_machine(tiny_data, tmp_path, monkeypatch):
    import pandas as pd

    import search
    from moebert.names import DEFAULT_BASE_MODEL_ID, default_base_model
    from moebert.search.index import PaperIndex, SearchError

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # every path below is absolute, outside the working directory
    out, known_base = tmp_path / "out", default_base_model()  # the embedded base, given by its local folder
    card = run_train(known_base, tiny_data, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                     "--stem_cache_dir", str(tmp_path / "stems"), "--max_seq_length", "16")
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_BASE_MODEL_ID and card.args["model_name_or_path"] == DEFAULT_BASE_MODEL_ID
    assert card.args["output_dir"] == "out" and card.datasets == {"CVD": "CVD", "COPD": "COPD"}
    papers = pd.DataFrame({"id": ["a", "b"], "text": ["heart failure", "asthma"], "domain": ["CVD", "COPD"]})
    papers.to_csv(tmp_path / "papers.csv", index=False)
    search.main(["index", "--papers", str(tmp_path / "papers.csv"), "--model", str(out), "--output_dir",
                 str(tmp_path / "index"), "--max_seq_length", "16", "--device", "cpu", "--precision", "fp32"])
    local = [str(tmp_path), str(Path(known_base).resolve()), str(Path.home()), sys.prefix]
    for folder in (out, workspace_of(out) / "checkpoint-2", tmp_path / "index"):  # a checkpoint is pushed too
        assert not local_paths_in(folder, local), local_paths_in(folder, local)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert (manifest["model"], manifest["model_path"]) == ("out", "../out")  # a public name; where it is, relatively
    assert PaperIndex.load(tmp_path / "index").search(["asthma"], "COPD", 1)[0]["hits"][0]["id"] == "b"
    moved = shutil.copytree(tmp_path / "index", tmp_path / "elsewhere" / "index")  # without its model
    with pytest.raises(SearchError, match="built with the model 'out', which is not here.*pass --model"):
        PaperIndex.load(moved)
    assert PaperIndex.load(moved, model=str(out)).search(["asthma"], "COPD", 1)[0]["hits"][0]["id"] == "b"


def test_public_names_of_local_folders(tmp_path, monkeypatch):
    from moebert.names import DEFAULT_BASE_MODEL_ID, default_base_model, public_name

    monkeypatch.chdir(tmp_path)
    cache = tmp_path.parent / "hub" / "models--allenai--scibert_scivocab_uncased" / "snapshots" / "abc123"
    assert public_name(default_base_model()) == DEFAULT_BASE_MODEL_ID
    assert public_name(str(cache)) == "allenai/scibert_scivocab_uncased"
    dataset = tmp_path.parent / "hub" / "datasets--org--cvd-pairs" / "snapshots" / "abc123" / "CVD"
    assert public_name(str(dataset)) == "org/cvd-pairs"  # a dataset snapshot by its repo id
    assert public_name(str(tmp_path / "data" / "CVD")) == "data/CVD"  # under the working directory: relative
    assert public_name(str(tmp_path.parent / "elsewhere" / "bert")) == "bert"
    assert public_name("bert-base-uncased") == "bert-base-uncased" and public_name("data/CVD") == "data/CVD"
    assert public_name("../x/y") == "y" and public_name("data/../../x/y") == "y"  # folders outside: their name


# ------------------------------------------------------------------------------------------------ bad files, full disks


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_to_resume_from(tiny_bert, tiny_data, tmp_path,
                                                                                       monkeypatch):
    from safetensors.torch import load_file

    steps = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "0"]
    run_train(tiny_bert, tiny_data, tmp_path / "straight", *steps)
    from moebert.training import workspace

    save_model = workspace.save_model

    def killed_in_checkpoint_2(model, tokenizer, folder, state):
        if ".tmp-checkpoint-2" in str(folder):
            raise SimulatedKill("while writing checkpoint-2")
        return save_model(model, tokenizer, folder, state)

    with monkeypatch.context() as patch:
        patch.setattr(workspace, "save_model", killed_in_checkpoint_2)
        with pytest.raises(SimulatedKill):
            run_train(tiny_bert, tiny_data, tmp_path / "out", *steps)
    assert [p.name for p in Workspace(tmp_path / "out").checkpoints()] == ["checkpoint-1"]  # the half one is no checkpoint
    card = run_train(tiny_bert, tiny_data, tmp_path / "out", *steps, "--resume_from_checkpoint", "latest")
    assert card.step == 3
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    for key, tensor in load_file(tmp_path / "out" / "model.safetensors").items():
        torch.testing.assert_close(tensor, straight[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("full_at", ["best_model", "checkpoint", "checkpoint_start", "final"])
def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_model(tiny_bert, tiny_data, tmp_path, monkeypatch,
                                                                       full_at):
    import errno

    from safetensors.torch import load_file

    out = tmp_path / "out"
    steps = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "0"]
    run_train(tiny_bert, tiny_data, out, "--max_train_steps", "1", *steps)
    before = load_file(out / "model.safetensors")
    checkpoint = load_file(workspace_of(out) / "checkpoint-1" / "model" / "model.safetensors")
    save_pretrained = MoEBertModel.save_pretrained
    where = {"best_model": ".tmp-best_model", "checkpoint": ".tmp-checkpoint-2", "final": ".tmp-out"}.get(full_at)

    def disk_full(self, folder, *args, **kwargs):
        save_pretrained(self, folder, *args, **kwargs)  # part of the files are written, then the disk is full
        if where in Path(folder).parts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def disk_full_at_once(*args, **kwargs):  # before the checkpoint's folder exists
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if full_at == "checkpoint_start":
        monkeypatch.setattr(train.Accelerator, "save_state", disk_full_at_once)
    else:
        monkeypatch.setattr(MoEBertModel, "save_pretrained", disk_full)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*No space left on device.*every finished checkpoint are "
                                         r"intact\. .*resume with --resume_from_checkpoint latest\.$"):
        resume = [] if full_at == "best_model" else ["--resume_from_checkpoint", "latest", "--eval_steps", "0"]
        run_train(tiny_bert, tiny_data, out, "--max_train_steps", "2", "--learning_rate", "1e-2", *steps, *resume)
    for key, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, before[key], atol=0, rtol=0, msg=key)
    for key, tensor in load_file(workspace_of(out) / "checkpoint-1" / "model" / "model.safetensors").items():
        torch.testing.assert_close(tensor, checkpoint[key], atol=0, rtol=0, msg=key)
    leftovers = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob(".tmp-*")]
    assert not leftovers  # the half-written copy's space is given back
    if full_at == "final":  # the checkpoint of step 2 was written before the disk filled up
        assert (workspace_of(out) / "checkpoint-2" / "model" / "model.safetensors").is_file()


def test_a_truncated_weights_file_is_refused_in_one_line(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_train(tiny_bert, tiny_data, out, "--max_train_steps", "1")
    weights = out / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt; download or copy it again"):
        torch_encoder(out, 32, 2)
    with pytest.raises(SystemExit, match="truncated or corrupt"):  # continuing training from it
        train.main(["--recipe", "quick", "--model_name_or_path", str(out), "--dataset", f"CVD={tiny_data / 'CVD'}", "--output_dir",
                    str(tmp_path / "more"), "--max_seq_length", "32"])


def test_stored_stem_states_cut_short_end_the_run_in_one_line(tiny_bert, tiny_data, tmp_path):
    run_train(tiny_bert, tiny_data, tmp_path / "out", "--max_train_steps", "1", "--stem_cache_dir", str(tmp_path / "stems"))
    [states] = (tmp_path / "stems").glob("*/states.npy")
    with open(states, "r+b") as f:
        f.truncate(states.stat().st_size // 2)
    with pytest.raises(SystemExit, match=r"^error: stem states in .* are cut short or do not match their inputs: delete "
                                         r"the folder to rebuild it\.$"):
        run_train(tiny_bert, tiny_data, tmp_path / "again", "--max_train_steps", "1", "--stem_cache_dir",
                  str(tmp_path / "stems"))


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tiny_bert, tiny_data, tmp_path):
    run_train(tiny_bert, tiny_data, tmp_path / "a", "--max_train_steps", "1", "--checkpointing_steps", "1")
    checkpoint = re.escape(str(tmp_path / "a-workspace" / "checkpoint-1"))
    with pytest.raises(SystemExit, match=rf"^error: --resume_from_checkpoint {checkpoint} was written for another model "
                                         r"\(moe_layers: checkpoint \[2, 3\], this run \[3\]\); resume with the flags it was "
                                         r"trained with, or start a new --output_dir\.$"):
        run_train(tiny_bert, tiny_data, tmp_path / "b", "--max_train_steps", "2", "--moe_layers", "3",
                  "--resume_from_checkpoint", str(tmp_path / "a-workspace" / "checkpoint-1"))
    with pytest.raises(SystemExit, match=r"^error: the checkpoint kept its best model by valid roc_auc, this run by f1_max: "
                                         r"resume with --metric_for_best_model roc_auc, or start a new run$"):
        run_train(tiny_bert, tiny_data, tmp_path / "c", "--max_train_steps", "2", "--metric_for_best_model", "f1_max",
                  "--resume_from_checkpoint", str(tmp_path / "a-workspace" / "checkpoint-1"))


def test_bad_rows_of_a_citation_graph_are_named_or_counted(tmp_path, capsys):
    from data.build import main as build

    good = [f"P{i},abstract number {i} on the heart and its vessels,X" for i in range(40)]
    links = [f"C{c},P{p}" for c in range(60) for p in ((c * 7) % 40, (c * 11 + 3) % 40, (c * 13 + 5) % 40)]

    def build_from(papers: bytes, citations: list[str]):
        (tmp_path / "papers.csv").write_bytes(b"id,text,domain\n" + papers)
        (tmp_path / "citations.csv").write_text("citing,cited\n" + "\n".join(citations) + "\n")
        return build(["graph", "--papers", str(tmp_path / "papers.csv"), "--citations", str(tmp_path / "citations.csv"),
                      "--output_dir", str(tmp_path / "out")])

    rows = ("\n".join(good) + "\n").encode()
    for extra, message in ((b"P40,a,row,with,five\n", "malformed table .*line 42.*fix or remove that row"),
                           (b"P40,caf\xe9 au lait,X\n", "not UTF-8 text .*convert the file to UTF-8"),
                           (b"P1,another text under a known id,X\n", r"paper ids occur more than once: \['P1'\]")):
        with pytest.raises(SystemExit):
            build_from(rows + extra, links)
        assert re.search(message, capsys.readouterr().err.splitlines()[-1])
        assert not (tmp_path / "out").exists()  # nothing written
    # empty texts, citations of unknown papers, self-citations and repeated links: dropped and counted
    def graph_counts():
        return json.loads((tmp_path / "out" / "summary.json").read_text())["graph"]

    build_from(rows, links)
    clean = graph_counts()
    build_from(rows + b"P40,,X\nP41,   ,X\n", links + ["C1,MISSING", "P3,P3", links[0]])
    counted = {"papers_without_text_dropped": 2, "links_to_papers_without_text_dropped": 1, "self_citations_dropped": 1,
               "duplicate_links_dropped": 1, "papers": 0}
    assert {k: graph_counts()[k] - clean[k] for k in counted} == counted


@requires_faiss
def test_an_empty_query_is_refused_in_one_line(tiny_bert, tmp_path, capsys):
    import pandas as pd

    import search

    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    pd.DataFrame({"id": ["a", "b"], "text": ["heart failure", "asthma"], "domain": ["CVD", "COPD"]}).to_csv(
        tmp_path / "papers.csv", index=False)
    search.main(["index", "--papers", str(tmp_path / "papers.csv"), "--model", str(tmp_path / "moe"), "--output_dir",
                 str(tmp_path / "index"), "--max_seq_length", "16", "--device", "cpu", "--precision", "fp32"])
    with pytest.raises(SystemExit, match=r"queries \[1\] are empty: give each query some text"):
        search.main(["query", "--index", str(tmp_path / "index"), "--text", "asthma", "--text", "  ", "--device", "cpu"])
