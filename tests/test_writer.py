"""Streaming sharded safetensors and the all-or-nothing output folder."""

import dataclasses
import errno
import json
import logging
import os
import tempfile
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rain_hf.config import ConfigError, RainMergingConfig, parse_size
from rain_hf.writer import (
    OutputExistsError,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_directory,
    plan_shards,
)


def test_shards_follow_byte_budget_and_reload_exactly(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16,
                                                                             torch.float16, torch.float32])}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardedSafetensorsWriter(tmp_path, specs, max_shard_size=450)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"] == {"total_parameters": 400, "total_size": sum(s.nbytes for s in specs)}
    loaded = {}
    for f in files:
        header_size = int.from_bytes((tmp_path / f).read_bytes()[:8], "little")
        assert header_size % 8 == 0, f  # padded, as safetensors writes it: the data starts 8-byte aligned
        loaded.update(load_file(tmp_path / f))
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)


def test_a_shard_may_fill_its_budget_exactly():
    specs = [TensorSpec(f"t{i}", (50,), torch.float32) for i in range(3)]  # 200 bytes each
    assert [[s.name for s in shard] for shard in plan_shards(specs, 400)] == [["t0", "t1"], ["t2"]]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 399)] == [["t0"], ["t1"], ["t2"]]
    # a first tensor above the budget (an embedding usually comes first) gets its own shard, and no empty one
    big = [TensorSpec("embed", (200,), torch.float32), *specs[:2]]
    assert [[s.name for s in shard] for shard in plan_shards(big, 400)] == [["embed"], ["t0", "t1"]]


def test_two_shards_get_an_index(tmp_path):
    specs = [TensorSpec(f"t{i}", (50,), torch.float32) for i in range(2)]
    w = ShardedSafetensorsWriter(tmp_path, specs, 200)
    for spec in specs:
        w.write(spec.name, torch.ones(50))
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"t0": "model-00001-of-00002.safetensors", "t1": "model-00002-of-00002.safetensors"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model-00001-of-00002.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers and other readers look for


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [TensorSpec("a", (2,), torch.float32)], 100)
    # a wrong name, shape or dtype would put bytes under a header that describes others: a corrupt file
    for name, tensor in (("b", torch.zeros(2)), ("a", torch.zeros(3)), ("a", torch.zeros(2, dtype=torch.bfloat16)),
                         ("a", torch.zeros(1, 2))):
        with pytest.raises(RuntimeError, match=r"Expected .*'a'"):
            w.write(name, tensor)
    w.write("a", torch.zeros(2))  # nothing was written by the refused calls: the planned tensor still fits
    with pytest.raises(RuntimeError, match="all planned tensors were already written"):
        w.write("a", torch.zeros(2))
    w.abort()


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):  # the parent folders made for the output go too, not existing ones
        with atomic_directory(tmp_path / "kept" / "a" / "b" / "out"):
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_file_system_that_refuses_chmod_or_a_failing_close_leave_no_debris(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refused)  # some mounted file systems do
    for target in (tmp_path / "new" / "sub" / "out", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()  # filled in place
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
        assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    monkeypatch.undo()
    # a shard whose close fails too (the flush of a full disk) must not replace the error that stopped the save
    (tmp_path / "w").mkdir()
    writer = ShardedSafetensorsWriter(tmp_path / "w", [TensorSpec("a", (2,), torch.float32)], 1 << 20)
    writer.write("a", torch.zeros(2))

    class FailingFile:
        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._file = FailingFile()
    writer.abort()
    assert writer._file is None


def test_atomic_directory_never_overwrites_unless_asked(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        with atomic_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (target / "keep.txt").read_text() == "old"
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_with_a_marker_replaces_only_an_earlier_output(tmp_path, monkeypatch):
    target = tmp_path / "models"
    (target / "other-model").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="holds no done.json, so it is not an earlier output"):
        with atomic_directory(target, overwrite=True, marker="done.json"):
            raise AssertionError("the block ran")
    assert (target / "other-model").is_dir()
    (target / "done.json").write_text("{}")
    with atomic_directory(target, overwrite=True, marker="done.json") as tmp:
        (tmp / "done.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["done.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # an empty working directory is filled in place, as any empty folder
    with atomic_directory(".", marker="done.json") as tmp:
        (tmp / "done.json").write_text("{}")
    assert [p.name for p in empty.iterdir()] == ["done.json"]
    monkeypatch.chdir(target)  # never the working directory or above it, marker or not
    for folder in (target, tmp_path, Path(".")):
        with pytest.raises(OutputExistsError, match="current directory or a folder above it"):
            with atomic_directory(folder, overwrite=True):
                pass
    monkeypatch.setenv("HOME", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(OutputExistsError, match="is the home folder"):
        with atomic_directory("~", overwrite=True, marker="done.json"):
            pass
    assert (target / "done.json").is_file()


def test_atomic_directory_through_a_symbolic_link(tmp_path):
    # a link to a folder on another disk: the output goes into the linked folder, and the link stays
    disk = tmp_path / "disk" / "out"
    disk.mkdir(parents=True)
    (disk / "done.json").write_text("{}")
    link = tmp_path / "out"
    link.symlink_to(disk)
    with atomic_directory(link, overwrite=True, marker="done.json") as tmp:
        (tmp / "done.json").write_text('{"new": 1}')
    assert link.is_symlink() and (disk / "done.json").read_text() == '{"new": 1}'
    # a dangling link is refused before anything is written
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(OutputExistsError, match=r"dangling is a symbolic link to .*gone, which does not exist: "
                                                "create that folder or name another one"):
        with atomic_directory(dangling):
            raise AssertionError("the block ran")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "disk", "out"]


def test_an_empty_folder_made_ahead_is_filled_in_place(tmp_path, monkeypatch):
    # a mount point, or a folder in a parent the user cannot write: the folder itself must stay where it is
    target = tmp_path / "volume"
    target.mkdir()
    inode = target.stat().st_ino
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            assert tmp.parent == target
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("boom")
    assert target.is_dir() and list(target.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "sub"]
    assert target.stat().st_ino == inode and [p.name for p in tmp_path.iterdir()] == ["volume"]


def test_an_output_that_cannot_be_moved_aside_is_named(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == target:  # what a mount point answers
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputExistsError, match=r"out could not be moved aside for the new output \(Device or "
                                                r"resource busy; a mount point cannot be\): empty it"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_output_is_an_ordinary_folder(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x.txt").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # not the private mode of the temporary folder


def test_atomic_directory_fills_an_existing_empty_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_save_leaves_folders_that_are_named(tmp_path, caplog):
    # SIGKILL (an out-of-memory kill) runs no cleanup: the next save must say what the hidden folders are
    target = tmp_path / "out"
    (target / ".partial-k1ll3d").mkdir(parents=True)
    for marker in (None, "done.json"):
        with pytest.raises(OutputExistsError, match=r"holds only \.partial-k1ll3d: half-written.*killed.*Delete"):
            with atomic_directory(target, overwrite=True, marker=marker):
                pass
    (target / "mine.txt").write_text("user data")  # not only debris: the usual refusal
    with pytest.raises(OutputExistsError, match="holds no done.json"):
        with atomic_directory(target, overwrite=True, marker="done.json"):
            pass
    (tmp_path / ".new.partial-abc").mkdir()
    (tmp_path / ".newer.partial-abc").mkdir()  # another output's: not named
    with caplog.at_level(logging.WARNING, logger="rain_hf"):
        with atomic_directory(tmp_path / "new") as tmp:
            (tmp / "a.txt").write_text("a")
    assert ".new.partial-abc, left by an earlier save of new that was killed" in caplog.text
    assert ".newer." not in caplog.text
    assert (tmp_path / "new" / "a.txt").is_file()


def test_unused_settings_name_what_a_merge_never_reads():
    from rain_hf.config import METHODS

    for method in METHODS:  # defaults, and the lam each method resolves to, are never flagged
        assert RainMergingConfig(method=method).unused_settings() == {}
    assert RainMergingConfig(method="ties", density=0.3, seed=2).unused_settings() == {"seed": 2}
    assert RainMergingConfig(method="dare_linear", density=0.3, seed=2).unused_settings() == {}
    assert RainMergingConfig(method="dare_ties", density=1.0, seed=5).unused_settings() == {"seed": 5}  # no mask
    assert RainMergingConfig(method="slerp", lam=2.0, slerp_t=0.2).unused_settings() == {"lam": 2.0}
    # lam='auto' measures L_think at the positions even with stage 1 off; a numeric lam reads no grid
    assert RainMergingConfig(stage1=False, positions="think", rcond=0.2).unused_settings() == {"rcond": 0.2}
    assert RainMergingConfig(lam=1.0, lam_grid=[1.0], lam_auto_max_kl=0.1, positions="think+prev",
                             window=2).unused_settings() == {"lam_grid": [1.0], "lam_auto_max_kl": 0.1, "window": 2}
    assert RainMergingConfig(projection="ridge", rcond=0.2, ridge=0.5).unused_settings() == {"rcond": 0.2}
    assert RainMergingConfig(do_sample=True, temperature=0.3, seed=1).unused_settings() == {}
    assert RainMergingConfig(lam=1.0, temperature=0.3, seed=1).unused_settings() == {"temperature": 0.3, "seed": 1}
    # no stage reads calibration data: none of its settings counts; lam='auto' without stage 1 holds nothing out
    assert RainMergingConfig(lam=1.0, stage1=False, stage2=False, max_length=8, think_spacing=["", "", ""],
                             batch_size=1).unused_settings() == {"think_spacing": ["", "", ""], "batch_size": 1,
                                                                 "max_length": 8}
    assert RainMergingConfig(stage1=False, lam_auto_holdout=0.5, seed=3).unused_settings() == {
        "lam_auto_holdout": 0.5, "seed": 3}
    edited = RainMergingConfig(method="ties")
    edited.think_spacing = ("\n", "\n", "\n\n")  # the default, as a tuple
    assert edited.unused_settings() == {}


def test_config_round_trip_and_validation(tmp_path):
    cfg = RainMergingConfig(lam=2.5, positions="think+prev", target_modules=["q_proj"], layers=[0, 1],
                            lam_auto_min_think_open=None)
    assert RainMergingConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert RainMergingConfig.load(tmp_path / "c.json") == cfg
    cfg.save(tmp_path / "new" / "folder" / "c.json")  # its folder made, as save_pretrained makes its own
    assert RainMergingConfig.load(tmp_path / "new" / "folder" / "c.json") == cfg
    # a torch dtype, as torch_dtype= takes it, is the dtype's name
    assert RainMergingConfig(output_dtype=torch.bfloat16).output_dtype == "bfloat16"
    for text, msg in [("null", "expected a JSON object .* got NoneType"), ('"config"', "got str"),
                      ("{lam: 1}", "not valid JSON")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConfigError, match=msg):
            RainMergingConfig.load(tmp_path / "bad.json")
    # a sidecar from a newer rain_hf with a field this one lacks: say which version wrote it
    sidecar = {"rain_hf_version": "99.0", "config": {**cfg.to_dict(), "future_field": 1}}
    (tmp_path / "s.json").write_text(json.dumps(sidecar))
    with pytest.raises(ConfigError, match=r"Unknown RainMergingConfig keys \['future_field'\].*written by rain_hf "
                                          r"99\.0 and this is rain_hf .*install rain_hf 99\.0"):
        RainMergingConfig.load(tmp_path / "s.json")
    # numpy numbers (a λ from np.linspace) are kept as the Python numbers they stand for; a typo is no new field
    import numpy as np

    numeric = RainMergingConfig(lam=np.float32(1.5), lam_grid=list(np.linspace(1, 2, 3)), layers=[np.int64(0)])
    assert type(numeric.lam) is float and numeric.lam_grid == [1.0, 1.5, 2.0] and type(numeric.layers[0]) is int
    assert all(type(v) is float for v in numeric.lam_grid) and RainMergingConfig.from_json(numeric.to_json()) == numeric
    with pytest.raises(AttributeError, match=r"no setting 'lamda' \('lamda': did you mean 'lam'\?\)"):
        numeric.lamda = 3.0
    arrays = RainMergingConfig(lam_grid=np.linspace(0.5, 2, 4), layers=np.arange(2))
    assert arrays.lam_grid == [0.5, 1.0, 1.5, 2.0] and arrays.layers == [0, 1] == RainMergingConfig(layers=range(2)).layers
    assert RainMergingConfig(stage2=np.bool_(False)).stage2 is False  # numpy's boolean is no number
    # set after the config was made (merger.config.lam_grid = …): saved as the JSON types they stand for
    arrays.lam_grid, arrays.lam, arrays.stage1 = np.linspace(1, 2, 3), np.float32(1.5), np.bool_(True)
    arrays.save(tmp_path / "set.json")
    again = RainMergingConfig.load(tmp_path / "set.json")
    assert (again.lam_grid, again.lam, again.stage1) == ([1.0, 1.5, 2.0], 1.5, True)
    arrays.layers = [object()]  # JSON cannot hold it: the file saved before is left whole
    with pytest.raises(TypeError, match="not JSON serializable"):
        arrays.save(tmp_path / "set.json")
    assert RainMergingConfig.load(tmp_path / "set.json") == again

    @dataclasses.dataclass
    class Extended(RainMergingConfig):  # a subclass's own fields and attributes are its business
        extra: int = 0

        def __post_init__(self):
            super().__post_init__()
            self.note = "mine"

    assert Extended(extra=2).extra == 2
    # an unset sequential is read as the mode stage 1 ran in (features passed in run one-shot whatever the data)
    ran = {"rain_hf_version": "0", "config": {**cfg.to_dict(), "sequential": None, "sequential_offload": True},
           "report": {"projection": "one-shot"}}
    (tmp_path / "s.json").write_text(json.dumps(ran))
    loaded = RainMergingConfig.load(tmp_path / "s.json")
    assert (loaded.sequential, loaded.sequential_offload) == (False, False)
    ran["report"]["projection"] = "sequential"
    (tmp_path / "s.json").write_text(json.dumps(ran))
    assert RainMergingConfig.load(tmp_path / "s.json").sequential is True
    with pytest.raises(ConfigError, match=r"This is a rain_merging_config.json sidecar .*RainMergingConfig.load"):
        RainMergingConfig.from_json(json.dumps(ran))
    for bad, msg in [({"method": "fancy"}, "method"), ({"lam": "big"}, "lam"), ({"rcond": 0}, "rcond"),
                     ({"coef_min": 2.0, "coef_max": 1.0}, "coef_min"), ({"positions": "all"}, "positions"),
                     ({"target_modules": "attention("}, "target_modules"), ({"layers": [-1]}, "layers"),
                     ({"think_open": "<t>", "think_close": "<t>"}, "differ"), ({"batch_size": 0}, "batch_size"),
                     ({"max_shard_size": "lots"}, "max_shard_size"), ({"stage1": "yes"}, "stage1"),
                     ({"sequential": True, "stage1": False}, "sequential"), ({"sequential": "yes"}, "null"),
                     ({"sequential_offload": 1}, "sequential_offload"),
                     ({"sequential_offload": True, "sequential": False}, "drop sequential_offload"),
                     ({"sequential_offload": True, "stage1": False}, "drop sequential_offload"),
                     ({"lam_auto_min_think_open": 1.5}, "between 0 and 1, or null"),
                     ({"lam_auto_min_think_open": "high"}, "think-open check off"),
                     ({"rcond": 1.0}, r"rcond=1.0 must be < 1"), ({"lam": float("nan")}, "finite"),
                     ({"lam": -1.0}, r"lam=-1.0 must be >= 0"), ({"lam_grid": [1.0, float("inf")]}, "finite"),
                     ({"coef_min": -0.5}, "coef_min"), ({"coef_min": 0.0, "coef_max": 0.0}, "coef_max"),
                     ({"layers": []}, "merges nothing"), ({"seed": 2**70}, r"seed must be an integer in \[0"),
                     ({"max_shard_size": "0.5B"}, "max_shard_size"), ({"max_shard_size": "infGB"}, "max_shard_size"),
                     ({"temperature": float("inf")}, "finite"),
                     ({"output_dtype": "float64"}, r"leave output_dtype unset \(None\) to save a float64 checkpoint")]:
        with pytest.raises(ConfigError, match=msg):
            RainMergingConfig(**bad)
    with pytest.raises(ConfigError, match="expects a dict"):
        RainMergingConfig.from_dict(None)
    assert RainMergingConfig.from_dict(types.MappingProxyType({"lam": 2.0})).lam == 2.0
    assert RainMergingConfig(lam_grid=(1.0, 2.0), layers=(0,)) == RainMergingConfig(lam_grid=[1.0, 2.0], layers=[0])
    assert parse_size("8Gb") == 10**9  # a lowercase b counts bits in decimal units, as in transformers
    assert parse_size("500Mib") == parse_size("500MiB") == 500 * 2**20
    with pytest.raises(ConfigError, match="finite"):
        RainMergingConfig(lam=10**400)
    with pytest.raises(ConfigError, match=r"lam_grid must be a finite number \(an int or a float\), got None"):
        RainMergingConfig(lam_grid=[1.0, None])
    assert RainMergingConfig(stage1=False).sequential is None  # unset: nothing to make sequential, no error
    edited = RainMergingConfig(lam=2.5)
    edited.lam, edited.method = None, "ties"  # unset again, as the merger's own copy is edited between merges
    edited.validate()
    assert edited.lam == 1.0 and RainMergingConfig(lam=None).lam == "auto"
    with pytest.raises(ConfigError, match="Unknown RainMergingConfig keys"):
        RainMergingConfig.from_dict({"lambda": 1})
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    assert parse_size(5e9) == parse_size("5e9") == parse_size("5000000000") == 5 * 10**9  # YAML's ways to write it
    for bad in (1.5, "1.5", "inf", float("nan")):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_size(bad)
    with pytest.raises(ConfigError, match=r"'linear' is mergekit's: a weighted average of whole models; the nearest "
                                          r"here are 'task_arithmetic'"):
        RainMergingConfig(method="linear")  # not dare_linear, which difflib would offer


def test_lam_auto_is_for_rain_only():
    with pytest.raises(ConfigError, match="method='rain' only"):
        RainMergingConfig(method="ties", lam="auto")


def test_writer_writes_every_dtype_the_reader_reads(tmp_path):
    from rain_hf.checkpoints import LazyCheckpoint

    tensors = {"u16": torch.arange(6).reshape(2, 3).to(torch.uint16), "u32": torch.arange(3).to(torch.uint32),
               "u64": torch.arange(2).to(torch.uint64), "bf": torch.randn(2, 2).bfloat16()}
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                                      max_shard_size=10**6)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    ckpt = LazyCheckpoint(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(ckpt.get(name), tensor)


def test_writer_names_a_dtype_safetensors_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="'c'.*complex64.*cast it"):
        ShardedSafetensorsWriter(tmp_path, [TensorSpec("c", (2,), torch.complex64)], max_shard_size=100)


def _interrupted_save(tmp_path, monkeypatch, before_replace):
    """Save over an existing output "out" (holding old.txt) while ``before_replace(src, dst, target)`` runs before
    each ``os.replace`` of the writer (it may raise KeyboardInterrupt); returns the target."""
    import os

    from rain_hf import writer as writer_module

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        before_replace(str(src), str(dst), target)
        return real_replace(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    return target


@pytest.mark.parametrize("failing_move", [".old-", "out"])
def test_atomic_directory_interrupted_while_swapping_leaves_old_output_and_no_debris(tmp_path, monkeypatch,
                                                                                   failing_move):
    interrupts = [1]

    def interrupt_once(src, dst, target):
        # ".old-": Ctrl-C while the old output is moved aside; "out": while the new one is moved into place
        if interrupts and failing_move in dst and (failing_move != "out" or dst == str(target)):
            interrupts.pop()
            raise KeyboardInterrupt

    target = _interrupted_save(tmp_path, monkeypatch, interrupt_once)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


def test_atomic_directory_never_deletes_the_previous_output_it_could_not_put_back(tmp_path, monkeypatch):
    def raced(src, dst, target):
        if dst == str(target) and ".partial-" in src:
            target.mkdir()  # another process takes the name while the old output is aside
            raise KeyboardInterrupt

    _interrupted_save(tmp_path, monkeypatch, raced)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(kept) == 1 and (kept[0] / "out" / "old.txt").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_an_interrupt_while_the_old_output_is_deleted_leaves_no_copy_of_it(tmp_path, monkeypatch):
    import shutil

    from rain_hf import writer as writer_module

    real_rmtree, interrupts = shutil.rmtree, [1]

    def rmtree(path, *args, **kwargs):
        if interrupts and ".old-" in str(path):  # Ctrl-C after the new output took the old one's place
            interrupts.pop()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(writer_module.shutil, "rmtree", rmtree)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden copy of the old output
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


@pytest.mark.parametrize("failing", ["mkdtemp", "replace"])
def test_parent_folders_made_for_an_output_that_was_not_written_are_removed(tmp_path, monkeypatch, failing):
    import os

    from rain_hf import writer as writer_module

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "mkdtemp":
        monkeypatch.setattr(writer_module.tempfile, "mkdtemp", refuse)
    else:
        real = os.replace
        monkeypatch.setattr(writer_module.os, "replace",
                            lambda src, dst: refuse() if ".partial-" in str(src) else real(src, dst))
    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(tmp_path / "a" / "b" / "out") as tmp:
            (tmp / "new.txt").write_text("new")
    assert list(tmp_path.iterdir()) == []
