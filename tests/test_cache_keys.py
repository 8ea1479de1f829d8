"""The key of a directory cache (cache/keys.py): what prepare computes keys it, or is refused.

In-process tests read the recipe (no workers).  The two-jobs tests run a
user program twice, as two separate processes on one directory, with an edit
in between, real workers and real entries: what changed must miss (prepare's
code and values, the code that items name, a library's files), what did not
must hit, even from another directory and another hash seed.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import threading

import numpy as np
import pytest

from mploader import CacheError, MPLoader, WorkerError
from mploader.cache.keys import ItemCode, Recipe, differences, origin, recipe

from .bounded import assert_quiet, report


def salt(prepare, version=None):
    return recipe(prepare, version, "/cache").salt()


# -- in process: what keys and what does not ------------------------------------------

def with_default(i, k=1):
    return i * k


def with_other_default(i, k=1000):
    return i * k


def make(k):
    def scaled(i):
        return i * k
    return scaled


class Identity:
    def load(self, i):
        return i


class Negate:
    def go(self, i):
        return -i - 500


class Ones:
    def __init__(self, i):
        self.v = 1


class Twos:
    def __init__(self, i):
        self.v = 2


class Scaler:
    factor = 2

    def __init__(self, k):
        self.k = k

    def __call__(self, i):
        return i * self.k * self.factor

    @staticmethod
    def fixed(i):
        return i

    @classmethod
    def made(cls, i):
        return cls(i)


class Scaler3(Scaler):
    factor = 3


TAGS = frozenset({"t1", "t2", "t3", "t4"})


def tagged(i):
    return i in TAGS or i in {"x", "y", "z"}


def test_same_code_keys_the_same():
    assert salt(with_default) == salt(with_default)
    assert salt(make(3)) == salt(make(3)), "two closures over equal values"
    assert salt(Scaler(2)) == salt(Scaler(2))
    assert salt(functools.partial(with_default, k=2)) == salt(functools.partial(with_default, k=2))


@pytest.mark.parametrize("one, other", [
    (with_default, with_other_default),                       # another function
    (make(1), make(1000)),                                    # a closure value
    (Identity().load, Negate().go),                           # bound methods of two classes
    (Ones, Twos),                                             # classes used as prepare
    (Scaler(1), Scaler(2)),                                   # a callable object's state
    (Scaler(1), Scaler3(1)),                                  # its class (an attribute)
    (Scaler.fixed, Scaler.made),                              # staticmethod, classmethod
    (functools.partial(with_default, k=2), functools.partial(with_default, k=3)),
    (functools.partial(Scaler(1).__call__), functools.partial(Scaler(2).__call__)),
    (lambda i: i + 1, lambda i: i + 2),                       # lambdas
    (math.sqrt, math.cos), (np.sqrt, np.cos), (len, abs),     # compiled code, by name
])
def test_what_prepare_computes_keys_it(one, other):
    assert salt(one) != salt(other)


def test_worker_init_keys_too():
    """What worker_init sets up in a worker, prepare may use."""
    def key(init):
        return recipe(with_default, None, "/cache", init).salt()
    assert len({salt(with_default), key(make(1)), key(make(2))}) == 3


def test_a_cache_version_keys_too_and_1_is_not_1_as_a_string():
    assert len({salt(with_default), salt(with_default, 1), salt(with_default, "1")}) == 3


def test_the_recipe_names_what_went_into_it():
    found = recipe(Scaler3(1), "v2", "/cache")
    assert found.prepare == f"a {__name__}:Scaler3 object"
    assert {f"{__name__}:Scaler", f"{__name__}:Scaler3", f"{__name__}:Scaler.__call__",
            f"{__name__}:Scaler.made"} <= found.code.keys()
    assert found.cache_version == "v2" and found.python.startswith(sys.implementation.name)
    assert recipe(lambda i: np.full(2, i), None, "/c").libraries["numpy"].startswith(np.__version__)
    assert Recipe.from_json(json.loads(json.dumps(found.to_json()))) == found


def test_whose_code_is_it():
    assert origin("numpy") == origin("numpy.linalg") == "library"
    assert origin("os") == origin("json") == origin("math") == origin("builtins") == "stdlib"
    assert origin("__main__") == origin(__name__) == "user"
    assert origin("no_such_module_here") == "unknown"


def test_sets_and_string_hashes_do_not_change_the_key(tmp_path):
    """Two processes with other hash seeds (set order) agree; so does a recipe here."""
    code = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})\n" \
           "from tests.test_cache_keys import salt, tagged; print(salt(tagged).hex())"
    salts = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONHASHSEED=seed), check=True).stdout
             for seed in ("1", "2", "3")}
    assert salts == {salt(tagged).hex() + "\n"}


class Viewed:
    """State that cloudpickle ships but plain pickle (the key's) cannot take."""

    def __init__(self):
        self.names = {"a": 1}.keys()

    def load(self, i):
        return i


def test_what_cannot_be_fingerprinted_is_refused_unless_a_version_keys_it():
    with pytest.raises(CacheError, match=r"prepare itself \(a method\).*dict_keys.*cache_version="):
        recipe(Viewed().load, None, "/cache")
    found = recipe(Viewed().load, "3", "/cache")
    assert found.unfingerprinted == ("prepare itself (a method)",)
    assert f"{__name__}:Viewed.load" in found.code, "the rest stays fingerprinted"
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(CacheError, match="the closure value `deep`.*nested too deeply"):
        recipe(lambda i: deep, None, "/cache")


def test_cycles_are_walked_once():
    class Node:
        def __init__(self):
            self.me = self
            self.friends = [self, {"back": self}]

        def load(self, i):
            return mutual(i)

    def mutual(i):
        return other(i) if i else i

    def other(i):
        return mutual(i - 1)

    assert salt(Node().load) == salt(Node().load)


def test_workers_that_would_compute_other_results_than_this_process_keys_refuse(
        tmp_path, monkeypatch):
    """The workers import the user's modules from their files: a module's
    global set at run time, or a module edited after this process imported it
    (a notebook's kernel), would make them compute what the key does not say."""
    (tmp_path / "edited_helper.py").write_text("SIZE = 1\n\ndef f(x):\n    return x + SIZE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("edited_helper")
    prepare = eval("lambda i: edited_helper.f(i)", {"edited_helper": module, "__name__": __name__})

    def values():
        with MPLoader(int, 3, prepare=prepare, cache=str(tmp_path / "cache"),
                      num_workers=1) as loader:
            return list(loader)

    try:
        assert values() == [1, 2, 3]
        module.SIZE = 5
        with pytest.raises(WorkerError, match=r"CacheError: the workers do not run the prepare "
                                              r".*the values read by edited_helper:f changed"):
            values()
        module.SIZE = 1
        (tmp_path / "edited_helper.py").write_text(
            "SIZE = 1\n\ndef f(x):\n    return x + 1000 * SIZE\n")
        with pytest.raises(WorkerError, match=r"prepare's code changed in edited_helper:f.*"
                                              r"reload it, or restart"):
            values()
        importlib.reload(module)
        assert values() == [1000, 1001, 1002]
    finally:
        del sys.modules["edited_helper"]


def test_differences_name_what_changed():
    mine = recipe(make(2), None, "/cache")
    other = Recipe(**{**mine.__dict__, "libraries": {"numpy": "1.26.4"}, "cache_version": 1,
                      "code": {**mine.code, "helpers:f": "0" * 32}})
    assert differences(mine, other) == [
        "cache_version 1 -> not given", "numpy was used, is not now",
        "helpers:f was used, is not now"]
    changed = Recipe(**{**mine.__dict__,
                        "code": {k: "1" * 32 for k in mine.code},
                        "values": {k: "2" * 32 for k in mine.values}})
    name = f"{__name__}:make.<locals>.scaled"
    assert differences(mine, changed) == [
        f"prepare's code changed in {name}",
        "prepare's own state changed (its bound object, partial arguments, or its object)",
        f"the values read by {name} changed (defaults, closure, globals or attributes)"]


# -- two jobs, one directory ------------------------------------------------------

JOB = """
import json, math, os, sys
sys.path.insert(0, os.environ["FAKE_SITE"])  # a library: its directory is a site-packages
import numpy as np
import fakelib, helper_mod
from mploader import CacheError, MPLoader, WorkerError

def same(i):
    return np.full(2, i, np.int64)

def with_default(i, k=@K@):
    return np.full(2, i * k, np.int64)

def make(k):
    def scaled(i):
        return np.full(2, i * k, np.int64)
    return scaled

def via_module(i):
    return np.full(2, helper_mod.f(i), np.int64)

class Scaler:
    def __init__(self, k):
        self.k = k
    def load(self, i):
        return np.full(2, i * self.k, np.int64)

class Cropper:
    def crop(self, i):
        return np.arange(100, dtype=np.int64)[i:i + 2]

class Ones:
    def __init__(self, i):
        self.v = np.full(2, 1, np.int64)

class Twos:
    def __init__(self, i):
        self.v = np.full(2, 2, np.int64)

def via_library(i):
    return np.full(2, fakelib.scale(i), np.int64)

class Viewed:
    def __init__(self):
        self.names = {"a": 1}.keys()
    def load(self, i):
        return np.full(2, i, np.int64)

def out(x):
    return np.asarray(getattr(x, "v", x), np.int64)

def run(name, prepare, **options):
    try:
        with MPLoader(out, 3, prepare=prepare, cache=os.path.join(sys.argv[1], name),
                      num_workers=1, **options) as loader:
            values = [v.tolist() for v in loader]
            stats, info = loader.stats()["cache"], loader.cache_info()
    except CacheError as exc:
        return {"error": str(exc)}
    return {"values": values, "hits": stats["hits"], "misses": stats["misses"],
            "why": [other["differences"] for other in info["others"]]}

cases = {"same": same, "default": with_default, "closure": make(@K@),
         "module_attr": via_module, "bound": @BOUND@, "classes": @CLASS@,
         "library": via_library, "stdlib_builtin": math.factorial, "unpicklable": Viewed().load}
found = {name: run(name, prepare) for name, prepare in cases.items()}
if os.environ.get("USEREXT"):
    import userext
    found["compiled"] = run("compiled", userext.twice)
    found["compiled_versioned"] = run("compiled_versioned", userext.twice, cache_version=1)
print(json.dumps(found))
"""

USEREXT_C = r"""
#include <Python.h>
static PyObject *twice(PyObject *self, PyObject *arg) {
    return PyLong_FromLong(2 * PyLong_AsLong(arg));
}
static PyMethodDef methods[] = {{"twice", twice, METH_O, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "userext", NULL, -1, methods};
PyMODINIT_FUNC PyInit_userext(void) { return PyModule_Create(&module); }
"""


def compiled_extension(where) -> bool:
    """Build userext, a C extension of the user's own, into ``where``; False without a compiler."""
    (where / "userext.c").write_text(USEREXT_C)
    target = where / ("userext" + sysconfig.get_config_var("EXT_SUFFIX"))
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"],
                        str(where / "userext.c"), "-o", str(target)], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def job(tmp_path, where, phase, cache, built):
    """The user's program, as it is in ``phase`` (1, or 2 after the edits), run from ``where``."""
    edits = {"@K@": "1" if phase == 1 else "1000",
             "@BOUND@": "Scaler(1).load" if phase == 1 else "Cropper().crop",
             "@CLASS@": "Ones" if phase == 1 else "Twos"}
    text = JOB
    for mark, value in edits.items():
        text = text.replace(mark, value)
    where.mkdir(exist_ok=True)
    (where / "job.py").write_text(text)
    (where / "helper_mod.py").write_text(
        f"def f(x):\n    return x + {1 if phase == 1 else 1000}\n")
    site = tmp_path / "site" / "site-packages"
    (site / "fakelib").mkdir(parents=True, exist_ok=True)
    (site / "fakelib" / "__init__.py").write_text(
        f"__version__ = '{phase}.0'\n\ndef scale(i):\n    return i * 7\n")
    env = dict(os.environ, FAKE_SITE=str(site), PYTHONHASHSEED=str(phase),
               USEREXT="1" if built else "")
    result = subprocess.run([sys.executable, str(where / "job.py"), str(cache)], cwd=where,
                            env=env, capture_output=True, text=True, timeout=180)
    assert_quiet(result)
    return report(result)


@pytest.mark.slow  # two programs of ~10 loaders each: ~8 s
def test_two_jobs_on_one_directory_hit_only_what_did_not_change(tmp_path):
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    first.mkdir()
    built = compiled_extension(first)
    one = job(tmp_path, first, 1, cache, built)
    second = tmp_path / "moved"  # another directory, another hash seed
    if built:
        second.mkdir()
        for ext in first.glob("userext*"):
            shutil.copy(ext, second)
    two = job(tmp_path, second, 2, cache, built)

    for name, got in one.items():
        if name not in ("unpicklable", "compiled"):
            assert got["misses"] == 3 and got["hits"] == 0, (name, got)
    hit = {"same": [[0, 0], [1, 1], [2, 2]], "stdlib_builtin": [1, 1, 2]}
    if built:
        hit["compiled_versioned"] = [0, 2, 4]
    for name, values in hit.items():
        assert two[name] == {"values": values, "hits": 3, "misses": 0, "why": []}, name
    missed = {  # what the second job computes, and why its entries are not the first's
        "default": ([[0, 0], [1000, 1000], [2000, 2000]],
                    "the values read by __main__:with_default changed"),
        "closure": ([[0, 0], [1000, 1000], [2000, 2000]],
                    "the values read by __main__:make.<locals>.scaled changed"),
        "module_attr": ([[1000, 1000], [1001, 1001], [1002, 1002]],
                        "prepare's code changed in helper_mod:f"),
        "bound": ([[0, 1], [1, 2], [2, 3]], "prepare is __main__:Cropper.crop bound to a "
                  "Cropper, was __main__:Scaler.load bound to a Scaler"),
        "classes": ([[2, 2], [2, 2], [2, 2]], "prepare is __main__:Twos, was __main__:Ones"),
        "library": ([[0, 0], [7, 7], [14, 14]], "fakelib 1.0 (code "),  # (no metadata)
    }
    for name, (values, why) in missed.items():
        got = two[name]
        assert (got["values"], got["hits"], got["misses"]) == (values, 0, 3), (name, got)
        assert len(got["why"]) == 1 and any(line.startswith(why) for line in got["why"][0]), \
            (name, got["why"])
    refused = ["unpicklable"] + (["compiled"] if built else [])
    for name in refused:
        for got in (one[name], two[name]):
            assert "cannot be fingerprinted" in got["error"] and "cache_version=" in got["error"]
    if built:
        assert "userext:twice is compiled code" in one["compiled"]["error"]
    else:
        pytest.skip("no C compiler: the refusal of a C extension of the user's own was not tried")


def test_a_library_reached_only_through_data_is_keyed_by_version():
    """An array in a closure: numpy's version keys it though no code names numpy."""
    table = np.arange(4)
    found = recipe(lambda i: table[i], None, "/cache")
    assert "numpy" in found.libraries


def test_a_function_imported_inside_prepare_is_walked(tmp_path, monkeypatch):
    (tmp_path / "late_helper.py").write_text("def g(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def prepare(i):
        from late_helper import g  # imported when it runs: not a global of prepare
        return g(i)

    try:
        found = recipe(prepare, None, "/cache")
        assert "late_helper:g" in found.code
    finally:
        sys.modules.pop("late_helper", None)



# -- random generators, libraries without metadata --------------------------------------

def test_random_generators_key_by_their_type_not_their_state():
    """Seeded from the operating system in every process (a MONAI transform's
    RandomState, an albumentations Compose's generators), reseeded per item
    from the item by the workers: their state would make every run miss."""
    def holding(generator):
        return lambda i: generator
    import random
    for make_one in (np.random.RandomState, np.random.default_rng, np.random.PCG64,
                     random.Random):
        assert salt(holding(make_one(1))) == salt(holding(make_one(2))), make_one
    assert len({salt(holding(np.random.RandomState(1))), salt(holding(random.Random(1))),
                salt(holding(np.random.default_rng(1)))}) == 3, "their types key"
    found = recipe(holding(np.random.default_rng()), None, "/cache")
    assert "numpy" in found.libraries


def test_a_library_without_metadata_is_keyed_by_its_files(tmp_path, monkeypatch):
    """No distribution metadata (on PYTHONPATH, copied by hand): nothing keyed
    an edit of it before; now its files do, never "unknown"."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "bare_lib.py").write_text("def prep(i):\n    return i * 1.0\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        import bare_lib
        assert origin("bare_lib") == "library"
        before = recipe(lambda i: bare_lib.prep(i), None, "/cache")
        assert before.libraries["bare_lib"].startswith("code ")
        (site / "bare_lib.py").write_text("def prep(i):\n    return i * 7.0\n")
        after = recipe(lambda i: bare_lib.prep(i), None, "/cache")
        assert before.salt() != after.salt()
        assert differences(after, before)[0].startswith("bare_lib code ")
    finally:
        sys.modules.pop("bare_lib", None)


LIBRARY_TABLE = '''
class Flip:
    def __init__(self, targets):
        self.table = {name: getattr(self, "apply_" + name) for name in targets}
    def apply_image(self, x):
        return x
    def apply_mask(self, x):
        return x
'''


def test_a_library_objects_table_of_its_methods_keys_in_any_order(tmp_path, monkeypatch):
    """albumentations builds a transform's target -> method dict from a set:
    in the order of string hashes, other in every process.  A library's table
    of its own methods keys by its keys; any other dict keeps its order."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "table_lib.py").write_text(LIBRARY_TABLE)
    monkeypatch.syspath_prepend(str(site))
    try:
        import table_lib

        def holding(value):
            return lambda i: value
        one, other = table_lib.Flip(["image", "mask"]), table_lib.Flip(["mask", "image"])
        assert list(one.table) != list(other.table)
        assert salt(holding(one)) == salt(holding(other))
        assert salt(holding(one)) != salt(holding(table_lib.Flip(["image"])))
        steps = Scaler(1)  # a user's dict of steps: its order may be the order they run in
        assert salt(holding({"a": steps.fixed, "b": steps.__call__})) != \
            salt(holding({"b": steps.__call__, "a": steps.fixed}))
    finally:
        sys.modules.pop("table_lib", None)


# -- the code that items refer to --------------------------------------------------------

class ItemCase:
    def __init__(self, i):
        self.i = i

    def load(self):
        return self.i


class OtherItemCase:
    def __init__(self, i):
        self.i = i

    def load(self):
        return -self.i


def item_pickle(item, version=None):
    data, code = ItemCode(version, "/cache").pickle(item)
    return data, list(code)


def test_an_items_pickle_is_unchanged_and_the_code_it_names_is_fingerprinted():
    import pathlib
    for item in (pathlib.Path("/data/case1.nii"), {"image": "a.nii", "label": [1, 2]},
                 (1, "x"), ItemCase(1), (3, with_default)):
        assert item_pickle(item)[0] == pickle.dumps(item, protocol=4), item
    assert item_pickle(pathlib.Path("/a"))[1] == [], "Python's own: Python's version keys it"
    [case] = item_pickle(ItemCase(1))[1]
    assert case == recipe(ItemCase, None, "/cache").salt()
    assert item_pickle(ItemCase(2))[1] == [case] != item_pickle(OtherItemCase(1))[1]
    assert item_pickle((3, with_default))[1] != item_pickle((3, with_other_default))[1]
    assert item_pickle(np.arange(3))[1], "a library's: its version"


def test_code_an_item_holds_by_value_keys_by_its_code():
    """A lambda, a class made in a function: no name a pickle can find them by."""
    def local_class():
        class Local:
            def load(self):
                return 1
        return Local()

    lambdas = [(1, lambda i: i + 1), (1, lambda i: i + 2)]
    first, second = (item_pickle(item) for item in lambdas)
    assert first[0] == second[0] and first[1] != second[1]
    assert item_pickle((1, lambda i: i + 1)) == first, "the same code: the same key"
    assert item_pickle(local_class()) == item_pickle(local_class())


class ItemWithALock:
    lock = threading.Lock()


def test_an_items_code_that_cannot_be_fingerprinted_is_refused_unless_a_version_keys_it():
    with pytest.raises(CacheError, match=r"the class attribute `lock` of .*ItemWithALock "
                                         r"\(a _thread.lock; reached from .*ItemWithALock, "
                                         r"which an item refers to\).*cache_version="):
        item_pickle(ItemWithALock())
    assert len(item_pickle(ItemWithALock(), version=1)[1]) == 1


ITEM_JOB = """
import dataclasses, json, os, pathlib, sys
sys.path.insert(0, os.environ["FAKE_SITE"])
import numpy as np
import bare_lib, edited_mod, kept_mod
from mploader import MPLoader

class MainCase:  # a class of __main__, the same in both jobs
    def __init__(self, i):
        self.i = i
    def load(self):
        return self.i + 5

@dataclasses.dataclass
class Spec:
    i: int
    def load(self):
        return self.i * 3

def load(item):
    return item.load()

def call(item):
    i, fn = item
    return fn(i)

def name_length(path):
    return len(path.name)

def via_bare_lib(i):
    return bare_lib.prep(i)

thrice = lambda i: i * 3

cases = {
    "edited_class": (load, [edited_mod.Case(i) for i in range(3)]),
    "edited_function": (call, [(i, edited_mod.scale) for i in range(3)]),
    "edited_lambda": (call, [(i, edited_mod.twice) for i in range(3)]),
    "bare_library": (via_bare_lib, range(3)),
    "bare_library_in_items": (call, [(i, bare_lib.prep) for i in range(3)]),
    "kept_class": (load, [kept_mod.Case(i) for i in range(3)]),
    "kept_function": (call, [(i, kept_mod.scale) for i in range(3)]),
    "kept_lambda": (call, [(i, kept_mod.twice) for i in range(3)]),
    "main_class": (load, [MainCase(i) for i in range(3)]),
    "main_lambda": (call, [(i, thrice) for i in range(3)]),
    "dataclass": (load, [Spec(i) for i in range(3)]),
    "paths": (name_length, [pathlib.Path("/data") / ("c" * i + ".nii") for i in range(3)]),
}
found = {}
for name, (prepare, items) in cases.items():
    with MPLoader(lambda x: np.full(2, x, np.int64), items, prepare=prepare,
                  cache=os.path.join(sys.argv[1], name), num_workers=1) as loader:
        values = [int(v[0]) for v in loader]
        stats = loader.stats()["cache"]
        code = sorted(loader.cache_info()["item_code"])
    found[name] = {"values": values, "hits": stats["hits"], "misses": stats["misses"],
                   "item_code": code}
print(json.dumps(found))
"""

MODULE = """
def scale(i):
    return i * @K@

twice = lambda i: i * 2 * @K@

class Case:
    def __init__(self, i):
        self.i = i
    def load(self):
        return self.i * @K@
"""


def item_job(tmp_path, where, phase, cache):
    """The user's program of items of their own classes and functions, as it
    is in ``phase`` (1, or 2 after edits to edited_mod and bare_lib)."""
    k = "1" if phase == 1 else "100"
    where.mkdir()
    (where / "job.py").write_text(ITEM_JOB)
    (where / "edited_mod.py").write_text(MODULE.replace("@K@", k))
    (where / "kept_mod.py").write_text(MODULE.replace("@K@", "1"))
    site = tmp_path / "site" / "site-packages"  # a library with no metadata, no __version__
    site.mkdir(parents=True, exist_ok=True)
    (site / "bare_lib.py").write_text(f"def prep(i):\n    return i * 7 * {k}\n")
    env = dict(os.environ, FAKE_SITE=str(site), PYTHONHASHSEED=str(phase))
    result = subprocess.run([sys.executable, str(where / "job.py"), str(cache)], cwd=where,
                            env=env, capture_output=True, text=True, timeout=180)
    assert_quiet(result)
    return report(result)


@pytest.mark.slow  # two programs of 12 loaders each: ~8 s
def test_two_jobs_key_the_code_items_refer_to_and_libraries_without_metadata(tmp_path):
    """An item's pickle names its class (a function it holds) without its
    code; a library with no metadata has no version: an edit of either
    served the first job's results to the second.  The second job runs from
    another directory, with another hash seed."""
    cache = tmp_path / "cache"
    one = item_job(tmp_path, tmp_path / "first", 1, cache)
    two = item_job(tmp_path, tmp_path / "moved", 2, cache)
    for name, got in one.items():
        assert (got["hits"], got["misses"]) == (0, 3), (name, got)
    assert one["edited_class"]["item_code"] == ["edited_mod:Case"]
    assert one["main_lambda"]["item_code"] == ["__main__:<lambda>"]
    assert one["paths"]["item_code"] == [], "Python's own classes add nothing"
    edited = {"edited_class": [0, 100, 200], "edited_function": [0, 100, 200],
              "edited_lambda": [0, 200, 400], "bare_library": [0, 700, 1400],
              "bare_library_in_items": [0, 700, 1400]}
    for name, values in edited.items():
        got = two[name]
        assert (got["values"], got["hits"], got["misses"]) == (values, 0, 3), (name, got)
    for name, got in two.items():
        if name not in edited:
            assert got == {**one[name], "hits": 3, "misses": 0}, (name, got)
