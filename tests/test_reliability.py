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
from conftest import DOMAINS
from test_train import run_train

import train
import training

# ------------------------------------------------------------------------------------------------ whole-folder saves


def model_files(folder):
    """{relative path: content} of the model a folder holds, as its manifest lists it (safetensors files by their
    tensors and metadata: the header's key order varies from one write to the next)."""
    from safetensors import safe_open

    listed = json.loads((folder / training.MODEL_FILES).read_text())
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert set(listed) <= on_disk

    def content(path):
        if path.suffix != ".safetensors":
            return path.read_bytes()
        with safe_open(path, framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}

    return {name: content(folder / name) for name in listed}


def test_a_save_cut_at_any_point_leaves_the_old_model_or_the_new_one(tiny_bert, tmp_path, monkeypatch):
    from modeling_moebert import MoEBertModel

    old_model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)
    old_model.add_domain("ONC", tokenizer)  # the old model has an expert file the new one lacks
    new_model = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)[0]
    with torch.no_grad():
        new_model.encoder.layer[0].experts[0].output.weight.add_(1.0)
    card = {"domains": DOMAINS, "datasets": {}, "args": {"output_dir": "out"}, "metrics": {}}
    folder, rmtree, replace, link = tmp_path / "out", shutil.rmtree, os.replace, os.link

    def old_folder():
        for name in ("out", ".tmp-out", ".old-out"):
            rmtree(tmp_path / name, ignore_errors=True)
        training.save_model(old_model, tokenizer, folder, card | {"step": 1})
        (folder / "checkpoint-3").mkdir()
        (folder / "checkpoint-3" / "optimizer.bin").write_bytes(b"state")  # not the model: kept by every save
        return model_files(folder)

    new = model_files(_saved(new_model, tokenizer, tmp_path / "reference", card | {"step": 2}))
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
                training.save_model(new_model, tokenizer, folder, card | {"step": 2})
                finished = True
            except SimulatedKill:
                finished = False
        training.recover_folder(folder)  # what the next save or run does first
        held = model_files(folder)
        assert held in (old, new), f"a mix after a kill at file operation {fail_at}"
        assert (folder / "checkpoint-3" / "optimizer.bin").read_bytes() == b"state"
        outcomes.append("new" if held == new else "old")
        if finished:
            break
    assert finished and outcomes[-1] == "new" and "old" in outcomes and outcomes.count("new") > 1, outcomes


class SimulatedKill(BaseException):
    """Stops the save where it is, like a kill: no `except Exception` on the way catches it."""


def _saved(model, tokenizer, folder, card):
    training.save_model(model, tokenizer, folder, card)
    return folder


# ------------------------------------------------------------------------------------------------ preemption


def start_training(tiny_bert, data, output_dir, *extra):
    command = [sys.executable, train.__file__, "--model_name_or_path", tiny_bert, "--dataset", f"CVD={data / 'CVD'}",
               "--dataset", f"COPD={data / 'COPD'}", "--output_dir", str(output_dir), "--per_device_train_batch_size",
               "4", "--max_seq_length", "32", "--seed", "3", "--max_train_steps", "100000", "--eval_steps", "0", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ | {"HF_HUB_OFFLINE": "1"})
    streams = {"out": "", "err": ""}

    def read(name, stream):  # whatever arrives (progress bars end their updates with \r, not \n)
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            streams[name] += chunk.decode(errors="replace")

    for name, stream in (("out", process.stdout), ("err", process.stderr)):
        threading.Thread(target=read, args=(name, stream), daemon=True).start()
    return process, streams


def wait_for(streams, name, text, process, timeout=120):
    deadline = time.time() + timeout
    while text not in streams[name] and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert text in streams[name], streams["err"][-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_training_after_the_step_with_a_checkpoint_to_resume_from(tiny_bert, tiny_data, tmp_path, signum):
    out = tmp_path / "out"
    process, streams = start_training(tiny_bert, tiny_data, out)
    wait_for(streams, "err", "training:", process)  # the loop has started
    time.sleep(0.5)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    time.sleep(0.2)  # the reader threads drain the pipes
    stopped = [line for line in streams["out"].splitlines() if line.startswith("stopped by")]
    assert stopped, streams["err"][-3000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert step > 0 and f"checkpoint in {out / f'checkpoint-{step}'}" in stopped[0]
    assert stopped[0].rstrip().endswith("--resume_from_checkpoint latest")
    assert (out / f"checkpoint-{step}" / "model" / "config.json").is_file() and not (out / "model.safetensors").exists()
    card = run_train(tiny_bert, tiny_data, out, "--max_train_steps", str(step + 2), "--eval_steps", "0",
                     "--resume_from_checkpoint", "latest")
    assert card["step"] == step + 2


def test_a_second_signal_exits_at_once(tiny_bert, tiny_data, tmp_path):
    process, streams = start_training(tiny_bert, tiny_data, tmp_path / "out")
    wait_for(streams, "err", "training:", process)
    process.send_signal(signal.SIGTERM)
    wait_for(streams, "err", "SIGTERM: stopping after this step", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # killed by the signal itself, no clean-up
    assert "stopped by" not in streams["out"]


def test_the_resume_command_keeps_every_flag_but_the_old_resume():
    argv = ["train.py", "--seed", "3", "--resume_from_checkpoint", "checkpoint-4", "--output_dir", "o"]
    assert train.resume_command(argv) == "python train.py --seed 3 --output_dir o --resume_from_checkpoint latest"
    assert train.resume_command(["train.py", "--resume_from_checkpoint=x"]) == "python train.py --resume_from_checkpoint latest"


# ------------------------------------------------------------------------------------------------ published files


def local_paths_in(folder, local_prefixes) -> list[str]:
    """Text files under `folder` (json, jsonl, md, txt) that name a folder of this machine."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".txt"):
            text = path.read_text(errors="replace")
            found += [f"{path.relative_to(folder)}: {p}" for p in local_prefixes if p in text]
    return found


def test_no_published_file_names_a_folder_of_this_machine(tiny_data, tmp_path, monkeypatch):
    import pandas as pd

    import search
    from defaults import DEFAULT_BASE_MODEL_ID, default_base_model

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # every path below is absolute, outside the working directory
    out, known_base = tmp_path / "out", default_base_model()  # the embedded base, given by its local folder
    card = run_train(known_base, tiny_data, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                     "--stem_cache_dir", str(tmp_path / "stems"), "--max_seq_length", "16")
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_BASE_MODEL_ID and card["args"]["model_name_or_path"] == DEFAULT_BASE_MODEL_ID
    assert card["args"]["output_dir"] == "out" and card["datasets"] == {"CVD": "CVD", "COPD": "COPD"}
    papers = pd.DataFrame({"id": ["a", "b"], "text": ["heart failure", "asthma"], "domain": ["CVD", "COPD"]})
    papers.to_csv(tmp_path / "papers.csv", index=False)
    search.main(["index", "--papers", str(tmp_path / "papers.csv"), "--model", str(out), "--output_dir",
                 str(tmp_path / "index"), "--max_seq_length", "16", "--device", "cpu", "--precision", "fp32"])
    local = [str(tmp_path), str(Path(known_base).resolve()), str(Path.home()), sys.prefix]
    for folder in (out, tmp_path / "index"):
        assert not local_paths_in(folder, local), local_paths_in(folder, local)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert (manifest["model"], manifest["model_path"]) == ("out", "../out")  # a public name; where it is, relatively
    assert search.PaperIndex.load(tmp_path / "index").search(["asthma"], "COPD", 1)[0]["hits"][0]["id"] == "b"
    moved = shutil.copytree(tmp_path / "index", tmp_path / "elsewhere" / "index")  # without its model
    with pytest.raises(search.SearchError, match="built with the model 'out', which is not here.*pass --model"):
        search.PaperIndex.load(moved)
    assert search.PaperIndex.load(moved, model=str(out)).search(["asthma"], "COPD", 1)[0]["hits"][0]["id"] == "b"


def test_public_names_of_local_folders(tmp_path, monkeypatch):
    from defaults import DEFAULT_BASE_MODEL_ID, default_base_model, public_name

    monkeypatch.chdir(tmp_path)
    cache = tmp_path.parent / "hub" / "models--allenai--scibert_scivocab_uncased" / "snapshots" / "abc123"
    assert public_name(default_base_model()) == DEFAULT_BASE_MODEL_ID
    assert public_name(str(cache)) == "allenai/scibert_scivocab_uncased"
    assert public_name(str(tmp_path / "data" / "CVD")) == "data/CVD"  # under the working directory: relative
    assert public_name(str(tmp_path.parent / "elsewhere" / "bert")) == "bert"
    assert public_name("bert-base-uncased") == "bert-base-uncased" and public_name("../x/y") == "../x/y"


# ------------------------------------------------------------------------------------------------ bad files, full disks


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_to_resume_from(tiny_bert, tiny_data, tmp_path,
                                                                                       monkeypatch):
    from safetensors.torch import load_file

    steps = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "0"]
    run_train(tiny_bert, tiny_data, tmp_path / "straight", *steps)
    save_model = train.save_model

    def killed_in_checkpoint_2(model, tokenizer, folder, card):
        if ".tmp-checkpoint-2" in str(folder):
            raise SimulatedKill("while writing checkpoint-2")
        return save_model(model, tokenizer, folder, card)

    with monkeypatch.context() as patch:
        patch.setattr(train, "save_model", killed_in_checkpoint_2)
        with pytest.raises(SimulatedKill):
            run_train(tiny_bert, tiny_data, tmp_path / "out", *steps)
    assert [p.name for p in training.checkpoints(tmp_path / "out")] == ["checkpoint-1"]  # the half one is no checkpoint
    card = run_train(tiny_bert, tiny_data, tmp_path / "out", *steps, "--resume_from_checkpoint", "latest")
    assert card["step"] == 3
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    for key, tensor in load_file(tmp_path / "out" / "model.safetensors").items():
        torch.testing.assert_close(tensor, straight[key], atol=1e-5, rtol=1e-4, msg=key)


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_model(tiny_bert, tiny_data, tmp_path, monkeypatch):
    import errno

    from safetensors.torch import load_file

    out = tmp_path / "out"
    run_train(tiny_bert, tiny_data, out, "--max_train_steps", "1")
    before = load_file(out / "model.safetensors")
    save_pretrained = train.MoEBertModel.save_pretrained

    def disk_full(self, folder, *args, **kwargs):
        save_pretrained(self, folder, *args, **kwargs)  # part of the files are written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train.MoEBertModel, "save_pretrained", disk_full)
    with pytest.raises(SystemExit, match="No space left on device.*every finished checkpoint are intact"):
        run_train(tiny_bert, tiny_data, out, "--max_train_steps", "2", "--learning_rate", "1e-2")
    for key, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, before[key], atol=0, rtol=0, msg=key)
    assert not (tmp_path / ".tmp-out").exists() and not (out / ".tmp-best_model").exists()  # the space is given back


def test_a_truncated_weights_file_is_refused_in_one_line(tiny_bert, tiny_data, tmp_path):
    import encoders

    out = tmp_path / "out"
    run_train(tiny_bert, tiny_data, out, "--max_train_steps", "1")
    weights = out / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt; download or copy it again"):
        encoders.load_encoder(str(out), 32, 2, "cpu")
    with pytest.raises(SystemExit, match="truncated or corrupt"):  # continuing training from it
        train.main(["--model_name_or_path", str(out), "--dataset", f"CVD={tiny_data / 'CVD'}", "--output_dir",
                    str(tmp_path / "more"), "--max_seq_length", "32"])


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tiny_bert, tiny_data, tmp_path):
    run_train(tiny_bert, tiny_data, tmp_path / "a", "--max_train_steps", "1", "--checkpointing_steps", "1")
    with pytest.raises(SystemExit, match=r"was written for another model \(moe_layers: checkpoint \[2, 3\], this run \[3\]"):
        run_train(tiny_bert, tiny_data, tmp_path / "b", "--max_train_steps", "2", "--moe_layers", "3",
                  "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-1"))


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
    # empty texts, citations of unknown papers, self-citations and repeated links: dropped and counted
    def graph_counts():
        return json.loads((tmp_path / "out" / "summary.json").read_text())["graph"]

    build_from(rows, links)
    clean = graph_counts()
    build_from(rows + b"P40,,X\nP41,   ,X\n", links + ["C1,MISSING", "P3,P3", links[0]])
    counted = {"papers_without_text_dropped": 2, "links_to_papers_without_text_dropped": 1, "self_citations_dropped": 1,
               "duplicate_links_dropped": 1, "papers": 0}
    assert {k: graph_counts()[k] - clean[k] for k in counted} == counted


def test_an_empty_query_is_refused_in_one_line(tiny_bert, tmp_path, capsys):
    import pandas as pd

    import search
    from modeling_moebert import MoEBertModel

    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    pd.DataFrame({"id": ["a", "b"], "text": ["heart failure", "asthma"], "domain": ["CVD", "COPD"]}).to_csv(
        tmp_path / "papers.csv", index=False)
    search.main(["index", "--papers", str(tmp_path / "papers.csv"), "--model", str(tmp_path / "moe"), "--output_dir",
                 str(tmp_path / "index"), "--max_seq_length", "16", "--device", "cpu", "--precision", "fp32"])
    with pytest.raises(SystemExit, match=r"queries \[1\] are empty: give each query some text"):
        search.main(["query", "--index", str(tmp_path / "index"), "--text", "asthma", "--text", "  ", "--device", "cpu"])
