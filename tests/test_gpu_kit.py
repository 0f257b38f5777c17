"""The offline GPU kit without a GPU: wheelhouse resolution on a local index of tiny wheels, part
splitting and joining, the model / tokenizer / adapter builder at a tiny shape, the tier estimate,
and the host driver end to end against simulated pods standing in for vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer

from bench.gpu import counterpart, model, parts, probe, share_probe, status, wheelhouse
from bench.report import build_report, collect
from bench.runner import prompt_tokens_of
from bench.workload import generate, load_spec
from vllm_sidecar.validation import validate_dir
from vllm_sim.tokenizer import apply_chat_template, count_tokens

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.25-real"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ parts
def test_split_join_roundtrip_and_corruption_refused(tmp_path: Path) -> None:
    src = tmp_path / "kit.tar.xz"
    src.write_bytes(bytes(range(256)) * 41 + b"tail")   # 10,500 bytes
    m = parts.split(src, tmp_path / "parts", part_size=4096, info={"packages": ["a==1"]})
    assert [p.size for p in m.parts] == [4096, 4096, 2308]
    assert parts.join(tmp_path / "parts", tmp_path / "out" / "kit.tar.xz").info == {"packages": ["a==1"]}
    assert (tmp_path / "out" / "kit.tar.xz").read_bytes() == src.read_bytes()

    bad = tmp_path / "parts" / "kit.tar.xz.001"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(parts.PartsError, match=r"kit\.tar\.xz\.001 is corrupted"):
        parts.join(tmp_path / "parts", tmp_path / "again.tar.xz")
    assert not (tmp_path / "again.tar.xz").exists()
    bad.write_bytes(bytes(data[:10]))
    with pytest.raises(parts.PartsError, match="has 10 bytes"):
        parts.verify(tmp_path / "parts")
    bad.unlink()
    with pytest.raises(parts.PartsError, match="is missing"):
        parts.verify(tmp_path / "parts")


def test_split_of_an_exact_multiple_has_no_empty_part(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x" * 8192)
    m = parts.split(src, tmp_path / "p", part_size=4096)
    assert [p.file for p in m.parts] == ["f.000", "f.001"]
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == ["f.000", "f.001", "manifest.json"]


# ------------------------------------------------------------------------------------ wheelhouse
def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), script: bool = False) -> Path:
    """A tiny valid py3-none-any wheel."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        zf.writestr(f"{dist}/METADATA", meta)
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        if script:
            info = zipfile.ZipInfo(f"{name}-{version}.data/scripts/{name}-tool")
            info.external_attr = 0o100755 << 16
            zf.writestr(info, "#!/bin/sh\necho tool\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


def test_wheelhouse_resolves_subtracts_and_packs(tmp_path: Path) -> None:
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "alpha", "1.0", ("beta>=1", "gamma", "hosted"), script=True)
    _wheel(index, "beta", "1.2")
    _wheel(index, "gamma", "0.1")
    _wheel(index, "hosted", "2.0")
    host = tmp_path / "host.txt"
    host.write_text("Hosted==2.0\nnumpy==2.5.2\n")
    opts = wheelhouse.WheelhouseOptions(
        out_dir=tmp_path / "kit", requirements=("alpha",), host_list=host, excluded={"gamma": "not needed"},
        pip=(sys.executable, "-m", "pip"), pip_args=("--isolated", "--no-index", "--find-links", str(index)),
        part_mib=0.0004)
    manifest = wheelhouse.build(opts)
    assert manifest.info["packages"] == ["alpha==1.0", "beta==1.2"]
    assert manifest.info["excluded"] == {"gamma": "not needed"}
    assert len(manifest.parts) >= 2 and all(p.size <= int(0.0004 * parts.MIB) for p in manifest.parts)
    tree = opts.out_dir / "tree"
    assert (tree / "alpha" / "__init__.py").is_file() and (tree / "beta-1.2.dist-info" / "METADATA").is_file()
    assert not (tree / "gamma").exists() and not (tree / "hosted").exists()
    assert (tree / "bin" / "alpha-tool").stat().st_mode & 0o111

    # what the host does: join, verify, unpack
    joined = parts.join(opts.out_dir / "parts", tmp_path / "host" / "kit.tar.xz")
    assert joined.sha256 == manifest.sha256
    with tarfile.open(tmp_path / "host" / "kit.tar.xz") as tar:
        tar.extractall(tmp_path / "host" / "tree", filter="data")
    out = subprocess.run([sys.executable, "-c", "import alpha, beta; print(alpha.VERSION, beta.VERSION)"],
                         env={"PYTHONPATH": str(tmp_path / "host" / "tree")}, capture_output=True, text=True)
    assert out.stdout.split() == ["1.0", "1.2"]


def test_wheelhouse_selection_of_the_h200_image() -> None:
    host = wheelhouse.read_host_list(wheelhouse.HOST_LIST)
    assert host["torch"] == "2.11.0" and host["pyyaml"] == "6.0.3"
    wheels = [wheelhouse.Wheel("torch", "2.11.0", "u/torch.whl", None), wheelhouse.Wheel("vllm", "0.25.1", "u/v.whl", None),
              wheelhouse.Wheel("flashinfer_python", "0.6", "u/f.whl", None)]
    sel = wheelhouse.select(wheels, host, wheelhouse.EXCLUDED)
    assert [w.name for w in sel.keep] == ["vllm"]
    assert [w.name for w in sel.on_host] == ["torch"] and [w.name for w in sel.excluded] == ["flashinfer_python"]
    assert wheelhouse.manylinux_platforms(31)[:2] == ["manylinux_2_31_x86_64", "manylinux_2_30_x86_64"]


# ------------------------------------------------------------------------------------ model
def test_tokenizer_counts_match_the_simulator_and_template_matches(tmp_path: Path) -> None:
    folder = model.write_model(tmp_path / "model", model.SHAPES["tiny"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 64
    assert model.model_config(model.SHAPES["8b"])["num_key_value_heads"] == 8
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)   # as transformers renders it
    template = env.from_string(tc["chat_template"])
    assert (folder / "chat_template.jinja").read_text() == tc["chat_template"]
    spec = load_spec(ROOT / "bench" / "specs" / "gpu-h200.yaml")
    trace = generate(spec, rate=3.0, requests=40)
    for req in trace:
        text = template.render(messages=req.messages, add_generation_prompt=True)
        assert text == apply_chat_template(req.messages)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) == count_tokens(text) == prompt_tokens_of(req)
        assert max(ids) < cfg["vocab_size"]
    # a follow-up shares its whole earlier prompt with its conversation's previous request, token for token
    by_conv: dict[int, list] = {}
    for req in trace:
        by_conv.setdefault(req.conversation, []).append(req)
    pairs = [(a, b) for reqs in by_conv.values() for a, b in zip(reqs, reqs[1:])]
    assert pairs
    for a, b in pairs:
        ia = tok.encode(apply_chat_template(a.messages, add_generation_prompt=False), add_special_tokens=False).ids
        ib = tok.encode(apply_chat_template(b.messages), add_special_tokens=False).ids
        assert ib[: len(ia) - 1] == ia[:-1]
    # every id of the model's vocabulary decodes to text (a sampled token is never silent)
    assert all(tok.id_to_token(i) for i in range(len(model.SPECIAL), cfg["vocab_size"]))


def test_adapters_have_vllm_names_and_shapes_and_pass_our_validation(tmp_path: Path) -> None:
    shape = model.SHAPES["tiny"]
    roots = [tmp_path / "s0", tmp_path / "s1"]
    sizes = model.write_adapter_sets(roots, [("a8", 8), ("a64", 64)], base_model="base-8b", shape=shape)
    for root in roots:
        for name, rank in (("a8", 8), ("a64", 64)):
            info = validate_dir(root / name, where=name, max_lora_rank=64, base_model="base-8b",
                                max_adapter_bytes=1 << 30)
            assert info.rank == rank and info.num_tensors == 2 * 7 * shape.num_hidden_layers
            assert set(info.target_modules) == set(model.ALL_MODULES)
    assert (roots[1] / "a8" / "adapter_model.safetensors").stat().st_size == sizes["a8"] == model.adapter_bytes(shape, 8)
    header = json.loads((roots[0] / "a8" / "adapter_model.safetensors").read_bytes()[8:8 + 20000].split(b"}}")[0] + b"}}")
    assert header["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]["shape"] == [8, 64]
    assert header["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]["shape"] == [32, 8]
    assert header["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]["shape"] == [8, 128]
    # the 8B shape gives the measured file sizes (42 / 84 / 168 / 336 MB) without writing them
    measured = json.loads((FIXTURES / "model-and-adapters.json").read_text())["adapter_bytes"]
    for rank in (8, 16, 32, 64):
        ours = model.adapter_bytes(model.SHAPES["8b"], rank)
        assert abs(ours - measured[f"r{rank}-0"]) / measured[f"r{rank}-0"] < 0.002


# ------------------------------------------------------------------------------------ tier estimate
def test_tier_estimate_follows_vllm_lru_per_pod() -> None:
    seq = ["A", "B", "A", "C", "B"]
    rows = [{"id": str(i), "adapter": a, "rank": 8, "pod": "s0", "status": 200, "sent_s": float(i)} for i, a in enumerate(seq)]
    rows.append({"id": "x", "adapter": "A", "rank": 8, "pod": "s1", "status": 200, "sent_s": 0.5})
    rows.append({"id": "y", "adapter": "A", "rank": 8, "pod": None, "status": 200, "sent_s": 0.7})
    assert counterpart.estimate_tiers(rows, max_loras=1, max_cpu_loras=2) == 6
    assert [r["est_adapter_tier"] for r in rows[:5]] == ["disk", "disk", "cpu", "disk", "disk"]
    assert rows[5]["est_adapter_tier"] == "disk" and "est_adapter_tier" not in rows[6]


# ------------------------------------------------------------------------------------ the driver
SPEC = """name: kit-e2e
seed: 3
cluster: {pods: 2, profile: 8b, base_model: base-8b, max_loras: 2, max_cpu_loras: 4, max_lora_rank: 64}
adapters: {count: 4, ranks: [8, 64], name_format: "ad{index:03d}"}
prefix: {system_prompts_per_adapter: 1, system_prompt_tokens: 60, followup_fraction: 0.5, followup_window: 4, max_turns: 3}
lengths: {user_tokens: {dist: uniform, min: 10, max: 30}, output_tokens: {dist: uniform, min: 4, max: 8}}
loads: [0.5]
requests: 12
"""
SIM_SERVER = ("{python} -m loraroute.cli sim --port {port} --model {model} --served-model-name {served} --enable-lora --allow-runtime-lora-updating "
              "--max-loras {max_loras} --max-cpu-loras {max_cpu_loras} --max-lora-rank {max_lora_rank} "
              "--adapter-dir {adapter_dir} --time-scale 0.05")


def _host(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.gpu", "host", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def driver_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One detached driver run on two simulated pods, followed with `host wait`; its work folder."""
    tmp = tmp_path_factory.mktemp("gpu-driver")
    spec = tmp / "spec.yaml"
    spec.write_text(SPEC)
    work = tmp / "work"
    started = _host("run", "--work", str(work), "--spec", str(spec), "--shape", "tiny", "--policies",
                    "default,round-robin,sglang", "--ramp-rates", "4", "--ramp-step-s", "2", "--poll-cost-s", "1",
                    "--probe-trials", "1", "--probe-rank", "8", "--share-trials", "1", "--server-cmd", SIM_SERVER, "--detach")
    assert started.returncode == 0, started.stderr
    waited = _host("wait", "--work", str(work), "--max-s", "150", timeout=170)
    assert waited.returncode == 0, (work / "driver.log").read_text()[-3000:]
    return work


def test_driver_end_to_end_on_simulated_pods(driver_run: Path) -> None:
    work = driver_run
    log = (work / "driver.log").read_text()
    for line in ("servers: server s1 ready", "warmup: s0: first LoRA request", "state: Redis and 2 sidecars up",
                 "probe: api-both-shared", "capacity: ramp 4.0 req/s", "replay default: default: ok 12/12",
                 "replay round-robin: round-robin: ok 12/12"):
        assert line in log
    st = status.read_status(work)
    assert st is not None and st["state"] == "done"
    names = [p["name"] for p in st["phases"]]
    assert names[:8] == ["build", "servers", "warmup", "share", "state", "capacity", "replay default",
                         "replay round-robin"] and names[-1] == "probe" and all(p["ok"] for p in st["phases"])

    results = work / "results"
    docs = collect([results / "replays"])
    assert sorted(d["meta"]["target"] for d in docs)[:2] == ["default", "round-robin"]
    for d in docs:
        assert d["meta"]["kind"] == "real-vllm" and d["meta"]["requests"] == 12
        assert d["meta"]["capacity"]["steps"][0]["rate_rps"] == 4.0
        assert any(r.get("est_adapter_tier") == "disk" for r in d["requests"])
    assert build_report([results / "replays"]).is_file()
    assert (results / "servers" / "default" / "s0-after-metrics.txt").read_text().count("vllm:") > 5
    assert json.loads((results / "servers" / "default" / "s1-after-models.json").read_text())["object"] == "list"
    probe_doc = json.loads((results / "probe.json").read_text())
    assert {r["condition"] for r in probe_doc["rows"]} == set(probe.CONDITIONS)
    share_doc = json.loads((results / "share.json").read_text())
    assert {(r["busy_neighbours"], r["kind"]) for r in share_doc["rows"]} == {
        (k, kind) for k in (0, 1) for kind in share_probe.KINDS}
    assert all(r["ms"] and r["ms"] > 0 for r in share_doc["rows"]), share_doc["rows"]
    assert set(share_doc["factors"]) == set(share_probe.KINDS)
    assert all(seq[0] == 1.0 and len(seq) == 2 and seq[1] > 0 for seq in share_doc["factors"].values())
    assert "share: slow-down with 0 … N-1 busy neighbours: prefill 1 / " in log
    run = json.loads((results / "run.json").read_text())
    assert run["api_server_cpu_pct_idle"]["with_sidecars"].keys() == {"s0", "s1"}
    assert run["threads_per_server"] == max(1, (os.cpu_count() or 1) // 2)


def test_results_pack_into_few_small_files(driver_run: Path, tmp_path: Path) -> None:
    packed = _host("pack", "--work", str(driver_run), "--out", str(tmp_path / "out"), "--max-file-mib", "0.05")
    assert packed.returncode == 0, packed.stderr
    files = list((tmp_path / "out").iterdir())
    assert 2 <= len(files) <= 8 and all(f.stat().st_size <= 0.05 * parts.MIB for f in files)
    parts.join(tmp_path / "out", tmp_path / "back.tar.xz")
    with tarfile.open(tmp_path / "back.tar.xz") as tar:
        names = tar.getnames()
    assert "status.json" in names and any(n.startswith("results/replays/") for n in names)
    assert any(n.startswith("logs/s0") for n in names) and any(n.startswith("logs/sidecar-s1") for n in names)


def test_simulated_counterpart_and_comparison(driver_run: Path, tmp_path: Path) -> None:
    real = [d for d in collect([driver_run / "results" / "replays"]) if d["meta"]["target"] == "default"]
    spec = driver_run.parent / "spec.yaml"
    written = counterpart.simulate(real, spec, "8b", tmp_path / "sim", time_scale=0.2)
    sim = collect(written)
    assert [d["meta"]["target"] for d in sim] == ["default"]
    assert sim[0]["meta"]["rate_rps"] == real[0]["meta"]["rate_rps"] and len(sim[0]["requests"]) == 12
    assert [r["id"] for r in sim[0]["requests"]] == [r["id"] for r in real[0]["requests"]]
    text = counterpart.report(real, sim)
    assert "| default | 12 / 12 |" in text and "| default | all | 12 |" in text
    assert "default p50: sim" in text
    # the same through the command line, with the simulated pods sharing one GPU as the servers did
    out = subprocess.run([sys.executable, "-m", "bench.gpu", "sim", str(driver_run / "results" / "replays"),
                          "--spec", str(spec), "--profile", "8b", "--time-scale", "0.2", "--out", str(tmp_path / "shared"),
                          "--gpu-share", str(driver_run / "results" / "share.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    shared = collect([tmp_path / "shared"])
    assert {d["meta"]["target"] for d in shared} >= {"default", "round-robin"}
    sim_args = shared[0]["meta"]["cluster"]["sim_args"]
    assert sim_args[sim_args.index("--pods-per-gpu") + 1] == "2" and "--gpu-share" in sim_args


def test_a_server_that_dies_at_start_fails_the_run_with_its_log(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    work = tmp_path / "work"
    out = _host("run", "--work", str(work), "--spec", str(spec), "--shape", "tiny",
                "--server-cmd", "{python} -c \"import sys; print('CUDA error: no device'); sys.exit(3)\"", timeout=60)
    assert out.returncode == 1
    assert "server s0 exited with 3 while starting" in out.stdout and "CUDA error: no device" in out.stdout
    st = status.read_status(work)
    assert st["state"] == "failed" and st["phases"][-1] == {**st["phases"][-1], "name": "servers", "ok": False}
    assert _host("status", "--work", str(work)).returncode == 1


def test_budget_stops_cleanly_and_keeps_the_results(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    work = tmp_path / "work"
    # 12 requests at 0.3 req/s need ~40 s of arrivals per policy: more than the budget holds
    out = _host("run", "--work", str(work), "--spec", str(spec), "--shape", "tiny", "--servers", "1",
                "--phases", "build,servers,state,replay", "--rate", "0.3", "--poll-cost-s", "0", "--budget-s", "25",
                "--reserve-s", "1", "--drain-s", "1", "--server-start-s", "1", "--server-cmd", SIM_SERVER, timeout=90)
    assert out.returncode == 3, out.stdout[-2000:]
    assert "budget spent" in out.stdout
    assert status.read_status(work)["state"] == "stopped"
    kept = collect([work / "results" / "replays"])
    assert [d["meta"]["target"] for d in kept] in ([], ["default"])
    assert all(len(d["requests"]) < 12 for d in kept)
    assert json.loads((work / "results" / "run.json").read_text())["servers"] == 1
    assert (work / "results" / "servers" / "final" / "s0-final-models.json").is_file()


def test_the_sharing_probe_prompts_are_distinct_token_sequences_for_the_kit_tokenizer(tmp_path: Path) -> None:
    """A nonce the kit's tokenizer maps to <unk> (digits) made every trial the same prompt: a
    prefix-cache hit after the first. The probe's words are all in the vocabulary."""
    model.write_model(tmp_path / "m", model.SHAPES["tiny"])
    tok = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    first = tok.encode(f"{share_probe.word(1)} {share_probe.LONG_PROMPT}").ids
    second = tok.encode(f"{share_probe.word(2)} {share_probe.LONG_PROMPT}").ids
    assert 990 <= len(first) <= 1010 and first.count(0) <= 1     # ≈ 1,000 known tokens
    assert first[0] != second[0]                                 # they differ from the first block on
    assert len({share_probe.word(n) for n in range(26 ** 3)}) == 26 ** 3
