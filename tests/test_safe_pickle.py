"""rsam.data.safe_pickle: plain-data pickles load in every protocol, hostile ones are refused before anything runs,
and the JSON cache is used, invalidated, repaired and optional."""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import subprocess

import pytest

from rsam.data import safe_pickle
from rsam.data.safe_pickle import PickleRefused, cached_json, load_plain_pickle, load_plain_pickle_cached

REF = {"ref_id": 1, "ann_id": 2, "image_id": 3, "category_id": 0, "split": "train", "file_name": "00001.jpg",
       "sent_ids": [5], "sentences": [{"raw": "The tank", "sent": "the tank", "tokens": ["the", "tank"], "sent_id": 5}]}


def write(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def write_raw(path, data):
    path.write_bytes(data)
    return path


def cache_files(folder):
    return sorted(folder.rglob("*.json"))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_refs_round_trip_in_every_protocol(tmp_path, protocol):
    refs = [REF, dict(REF, ref_id=7, sent_ids=(8, 9), split="val")]  # a tuple comes back as a list
    got = load_plain_pickle(write(tmp_path / "refs(unc).p", refs, protocol))
    assert got == [REF, dict(REF, ref_id=7, sent_ids=[8, 9], split="val")]
    assert type(got[1]["sent_ids"]) is list and type(got[0]["ref_id"]) is int


def test_set_frozenset_and_scalars_under_protocol_2(tmp_path):
    value = {"s": {3, 1, 2}, "f": frozenset(["a"]), "x": 1.5, "ok": True, "none": None, "b": b"\xc3\xa9t\xc3\xa9",
             "empty": b"", 7: "int key"}
    got = load_plain_pickle(write(tmp_path / "p.p", value, 2))
    assert sorted(got["s"]) == [1, 2, 3] and got["f"] == ["a"]
    got = (got["x"], got["ok"], got["none"], got["b"], got["empty"], got[7])
    assert got == (1.5, True, None, "été", "", "int key")


def test_python2_latin1_byte_strings_load(tmp_path):
    # What Python 2 writes for {'name': 'caf\xe9'} (byte strings: SHORT_BINSTRING); not valid UTF-8.
    py2 = b"\x80\x02}q\x00U\x04nameq\x01U\x04caf\xe9q\x02s."
    assert load_plain_pickle(write_raw(tmp_path / "py2.p", py2)) == {"name": "café"}
    # Python 3 bytes under protocol 2 go through _codecs.encode(text, "latin1"), which is allowed.
    assert load_plain_pickle(write(tmp_path / "py3.p", {"name": b"caf\xe9"}, 2)) == {"name": "café"}


class SystemPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class EvalPayload(SystemPayload):
    def __reduce__(self):
        return (eval, (f"open({str(self.target)!r}, 'w').close()",))


class PopenPayload(SystemPayload):
    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.target)],))


@pytest.mark.parametrize("payload, global_name", [
    (SystemPayload, f"{os.system.__module__}.system"), (EvalPayload, ".eval"), (PopenPayload, ".Popen")])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_hostile_pickles_are_refused_without_running(tmp_path, payload, global_name, protocol):
    pwned = tmp_path / "pwned"
    path = write(tmp_path / "refs(unc).p", [REF, {"evil": payload(pwned)}], protocol)
    with pytest.raises(PickleRefused) as info:
        load_plain_pickle(path)
    assert str(path) in str(info.value) and global_name in str(info.value)
    assert info.value.path == str(path) and info.value.global_name.endswith(global_name)
    assert not pwned.exists()
    again = pickle.loads(pickle.dumps(info.value))  # survives a trip between processes
    assert (type(again), str(again), again.global_name) == (PickleRefused, str(info.value), info.value.global_name)
    with pytest.raises(PickleRefused):  # the cached loader refuses too, and caches nothing
        load_plain_pickle_cached(path, cache_dir=tmp_path / "cache")
    assert not pwned.exists() and cache_files(tmp_path / "cache") == []


@dataclasses.dataclass
class UserRecord:
    name: str


@pytest.mark.parametrize("value, name", [(UserRecord("x"), "UserRecord|_reconstructor"), (collections.OrderedDict(a=1),
                                          "OrderedDict"), ({"rows": [UserRecord("y")]}, "UserRecord|_reconstructor")])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_instances_of_classes_are_refused(tmp_path, value, name, protocol):
    with pytest.raises(PickleRefused, match=name):
        load_plain_pickle(write(tmp_path / "obj.p", value, protocol))


@pytest.mark.parametrize("data", [b"not a pickle at all", pickle.dumps([REF] * 3)[:-40], b""])
def test_unreadable_files_are_value_errors_naming_the_file(tmp_path, data):
    path = write_raw(tmp_path / "broken.p", data)
    with pytest.raises(ValueError, match="broken.p: not a readable pickle") as info:
        load_plain_pickle(path)
    assert not isinstance(info.value, PickleRefused)


def test_path_manager_is_used_when_given(tmp_path):
    from iopath.common.file_io import PathManager

    opened = []

    class Recording(PathManager):
        def open(self, path, mode="r", **kwargs):
            opened.append((path, mode))
            return super().open(path, mode, **kwargs)

    path = write(tmp_path / "refs.p", [REF])
    assert load_plain_pickle(str(path), path_manager=Recording()) == [REF]
    assert opened == [(str(path), "rb")]


def test_second_call_reads_the_cache_not_the_pickle(tmp_path, monkeypatch):
    path = write(tmp_path / "refs.p", [REF])
    cache = tmp_path / "cache"
    assert load_plain_pickle_cached(path, cache_dir=cache) == [REF]
    assert len(cache_files(cache)) == 1
    mixed = write(tmp_path / "mixed.p", {1: ("a", {2.5: None}), None: {"k"}, "__rsam_items__": True})
    first = load_plain_pickle_cached(mixed, cache_dir=cache)
    assert first == {1: ["a", {2.5: None}], None: ["k"], "__rsam_items__": True}

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the pickle was read again")

    monkeypatch.setattr(safe_pickle, "load_plain_pickle", no_unpickling)
    monkeypatch.setattr(safe_pickle._PlainUnpickler, "load", no_unpickling)
    assert load_plain_pickle_cached(path, cache_dir=cache) == [REF]
    assert load_plain_pickle_cached(mixed, cache_dir=cache) == first  # non-str keys survive the JSON copy


def test_changed_file_invalidates_the_cache(tmp_path):
    path, cache = write(tmp_path / "refs.p", [REF]), tmp_path / "cache"
    assert load_plain_pickle_cached(path, cache_dir=cache) == [REF]
    old = os.stat(path).st_mtime_ns
    write(path, [REF, {"changed": True}])
    os.utime(path, ns=(old + 10**9, old + 10**9))
    assert load_plain_pickle_cached(path, cache_dir=cache) == [REF, {"changed": True}]


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    path, cache = write(tmp_path / "refs.p", [REF]), tmp_path / "cache"
    load_plain_pickle_cached(path, cache_dir=cache)
    (entry,) = cache_files(cache)
    for garbage in (b'{"truncated": [1, 2', b"\xff\xfe\x00binary", b'{"__rsam_items__": 3}'):
        entry.write_bytes(garbage)
        assert load_plain_pickle_cached(path, cache_dir=cache) == [REF]
        assert cache_files(cache) == [entry] and entry.read_bytes() != garbage


def test_unwritable_cache_dir_still_returns_the_data(tmp_path, caplog):
    (tmp_path / "a_file").write_text("not a directory")
    path = write(tmp_path / "refs.p", [REF])
    with caplog.at_level(logging.WARNING, logger="rsam.data.safe_pickle"):
        assert load_plain_pickle_cached(path, cache_dir=tmp_path / "a_file" / "cache") == [REF]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "rsam.data.safe_pickle"]
    assert len(warnings) == 1 and "cache" in warnings[0].getMessage()


def test_rsam_cache_dir_and_home_default(tmp_path, monkeypatch):
    path = write(tmp_path / "refs.p", [REF])
    monkeypatch.setenv("RSAM_CACHE_DIR", str(tmp_path / "env_cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_plain_pickle_cached(path) == [REF]
    assert len(cache_files(tmp_path / "env_cache")) == 1 and not (tmp_path / "home").exists()
    monkeypatch.delenv("RSAM_CACHE_DIR")
    assert load_plain_pickle_cached(path) == [REF]
    assert len(cache_files(tmp_path / "home" / ".cache" / "rsam")) == 1


def test_cached_json_builds_once_per_tag_and_uris_are_not_cached(tmp_path):
    source, cache, calls = write_raw(tmp_path / "index.txt", b"abc"), tmp_path / "cache", []

    def build():
        calls.append(1)
        return {"n": len(calls), "items": [1, 2]}

    assert cached_json(str(source), build, "index-v1", cache_dir=str(cache)) == {"n": 1, "items": [1, 2]}
    assert cached_json(str(source), build, "index-v1", cache_dir=str(cache)) == {"n": 1, "items": [1, 2]}
    assert cached_json(str(source), build, "index-v2", cache_dir=str(cache))["n"] == 2  # the tag is in the key
    assert cached_json("memory://nowhere/index.txt", build, "index-v1", cache_dir=str(cache))["n"] == 3
    assert len(cache_files(cache)) == 2


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_limits_refuse_with_one_line_naming_the_file_and_the_limit(tmp_path):
    from rsam.data.limits import MAX_PICKLE_DEPTH, PICKLE_ELEMENTS_FLOOR
    from rsam.data.safe_pickle import PickleTooLarge
    from rsam.errors import UserError

    looped: list = []
    looped.append(looped)
    cases = [
        (nested(MAX_PICKLE_DEPTH + 1), f"containers are nested deeper than {MAX_PICKLE_DEPTH} levels"),
        ([1, 2**63], "an integer of 64 bits is over the limit of 64-bit signed integers"),
        ([-(2**64)], "an integer of 65 bits"),
        (looped, "a container holds itself"),
        ([[0] * 300] * 300, f"it expands to more than {PICKLE_ELEMENTS_FLOOR} elements .the limit of a \\d+-byte "
                            "file: 4 per byte"),  # 90,301 elements from a 1.2 kB file
    ]
    for value, message in cases:
        path = write(tmp_path / "refs(unc).p", value, 2)
        with pytest.raises(PickleTooLarge, match=rf"refs\(unc\)\.p: refused to unpickle: {message}") as info:
            load_plain_pickle(path)
        assert isinstance(info.value, (PickleRefused, UserError)) and "\n" not in str(info.value)
        with pytest.raises(PickleTooLarge):  # the cached loader too, and it writes nothing
            load_plain_pickle_cached(path, cache_dir=tmp_path / "cache")
        assert cache_files(tmp_path / "cache") == []
    # at the limits: loads
    assert load_plain_pickle(write(tmp_path / "ok.p", [nested(MAX_PICKLE_DEPTH - 1), 2**63 - 1, -(2**63)])) \
        == [nested(MAX_PICKLE_DEPTH - 1), 2**63 - 1, -(2**63)]
    assert len(load_plain_pickle(write(tmp_path / "ok.p", [[0] * 100] * 100))) == 100  # shared, 10,101 elements


def test_the_cache_writer_stores_only_what_it_checked(tmp_path):
    from rsam.data.safe_pickle import PickleTooLarge

    source, cache = write_raw(tmp_path / "index.txt", b"abc"), tmp_path / "cache"
    for value, refused in (({"x": UserRecord("y")}, PickleRefused), ({"n": 10**30}, PickleTooLarge),
                           (nested(100), PickleTooLarge)):
        with pytest.raises(refused, match="index.txt: refused to unpickle"):
            cached_json(str(source), lambda: value, "index-v1", cache_dir=str(cache))
        assert cache_files(cache) == []
