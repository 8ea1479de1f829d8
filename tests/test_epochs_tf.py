"""Epochs through TensorFlow: resume with tf.train.Checkpoint and with Keras's
BackupAndRestore after a SIGKILL mid-epoch, shards under tf.distribute.

Every scenario is a real training script in child interpreters, killed and
started again as a preempted job would be.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from .bounded import assert_no_worker_left, joined, report, run_bounded

pytestmark = pytest.mark.tf

PRELUDE = """
    import json, os, signal, sys, time
    import numpy as np
    import tensorflow as tf
    from mploader import MPLoader
    def sample(i):
        return np.full(3, i, np.float32), np.float32(i)
"""


def killed_then_restarted(s, within: float = 120) -> dict:
    """Run ``s`` with argument "kill" (it SIGKILLs itself mid-epoch), then
    without; the report of the second run."""
    proc = s.start("kill")
    out, err = proc.communicate(timeout=within)
    assert proc.returncode == -9, f"status {proc.returncode}\n{err[-3000:]}"
    assert_no_worker_left(s.wait_for_pids())  # PR_SET_PDEATHSIG: gone with their parent
    s.pid_file.unlink()
    got = report(run_bounded(s, within=within))
    assert_no_worker_left(s.wait_for_pids())
    return got


def test_a_custom_loop_saved_with_checkpoint_manager_resumes_the_exact_batches(script):
    """SIGKILL three steps after the last save, in the middle of epoch 1."""
    s = script(joined(PRELUDE, """
        def make_loader():
            return MPLoader(sample, 22, num_workers=2, shuffle=True, seed=3)
        loader = make_loader()
        report_pids(loader)
        ds = loader.dataset().batch(4)          # no prefetch after: see README
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.SGD(0.001)
        step = tf.Variable(0, dtype=tf.int64)
        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                   data=loader.checkpointable())
        manager = tf.train.CheckpointManager(ckpt, "ckpt", max_to_keep=2)
        ckpt.restore(manager.latest_checkpoint)
        seen = {}
        if os.path.exists("seen.json"):
            seen = json.load(open("seen.json"))
        while int(step) < 12:                    # 6 batches an epoch: 2 epochs
            for x, y in ds:
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean((model(x)[:, 0] - y) ** 2)
                optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                              model.trainable_variables))
                step.assign_add(1)
                seen[str(int(step))] = y.numpy().tolist()
                json.dump(seen, open("seen.json", "w"))
                if int(step) % 2 == 0:
                    manager.save()
                if sys.argv[1:] == ["kill"] and int(step) == 9:
                    os.kill(os.getpid(), signal.SIGKILL)
                if int(step) == 12:
                    break
        reference = make_loader()
        expected = [y.numpy().tolist() for _ in range(2) for _, y in reference.dataset().batch(4)]
        print(json.dumps({"seen": [seen[str(i)] for i in range(1, 13)], "expected": expected}))
    """))
    got = killed_then_restarted(s)
    assert got["seen"] == got["expected"]
    assert got["seen"][:6] != got["seen"][6:], "both epochs had the same order"


def test_model_fit_with_backup_and_restore_replays_the_interrupted_epochs_order(script):
    s = script(joined(PRELUDE, """
        loader = MPLoader(sample, 16, num_workers=2, shuffle=True, seed=9)
        report_pids(loader)
        log = {}
        def record(y):
            log.setdefault(current[0], []).extend(y.numpy().tolist())
            return y
        current = [None]
        def logged(x, y):
            z = tf.py_function(record, [y], tf.float32)
            z.set_shape(y.shape)
            return x, z
        ds = loader.dataset().batch(4).map(logged)
        class Killer(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                current[0] = epoch
            def on_train_batch_end(self, batch, logs=None):
                if sys.argv[1:] == ["kill"] and current[0] == 1 and batch == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        model.fit(ds, epochs=3, verbose=0, callbacks=[
            tf.keras.callbacks.BackupAndRestore("backup"), loader.keras_callback(), Killer()])
        reference = MPLoader(sample, 16, num_workers=1, shuffle=True, seed=9)
        expected = [[float(y) for _, y in reference] for _ in range(3)]
        print(json.dumps({"log": {str(k): v for k, v in log.items()}, "expected": expected}))
    """))
    got = killed_then_restarted(s)
    # The restarted fit began at epoch 1 (BackupAndRestore), in epoch 1's order.
    assert sorted(got["log"]) == ["1", "2"], got["log"].keys()
    assert got["log"]["1"] == got["expected"][1] and got["log"]["2"] == got["expected"][2]


def test_dataset_consumed_directly_resumes_and_keeps_a_whole_epochs_cardinality(script):
    s = script(joined(PRELUDE, """
        make = lambda workers: MPLoader(sample, 13, num_workers=workers, shuffle=True, seed=2,
                                        batch_size=2)
        loader = make(2)
        report_pids(loader)
        it = iter(loader.dataset())
        head = [next(it)[1].numpy().tolist() for _ in range(3)]
        state = loader.state_dict()
        loader.close()
        restored = make(1)
        restored.load_state_dict(json.loads(json.dumps(state)))
        rest_ds = restored.dataset()
        rest = [y.numpy().tolist() for _, y in rest_ds]
        again = [y.numpy().tolist() for _, y in rest_ds]         # the next epoch, whole
        late = make(1)
        late_ds = late.dataset()                # made before the restore, as in a loop
        late.load_state_dict(state)             # that restores a checkpoint afterwards
        late_rest = [y.numpy().tolist() for _, y in late_ds]
        reference = make(1)
        expected = [[y.tolist() for _, y in reference] for _ in range(2)]
        # A restored rest with nothing in it (4 of 5 taken, restored on 2 shards):
        # its iteration is empty, the next one a whole epoch.
        taken = MPLoader(sample, 5, num_workers=1)
        it = iter(taken)
        [next(it) for _ in range(4)]
        empty_state = taken.state_dict()
        taken.close()
        narrow = MPLoader(sample, 5, num_workers=1, shard=(0, 2))
        narrow_ds = narrow.dataset()
        narrow.load_state_dict(empty_state)
        narrow_epochs = [len(list(narrow_ds)) for _ in range(2)]
        narrow.close()
        sharded = MPLoader(sample, 8, num_workers=1, shard=(0, 2))
        policy = sharded.dataset().options().experimental_distribute.auto_shard_policy
        sharded.close()
        got_off = policy == tf.data.experimental.AutoShardPolicy.OFF
        print(json.dumps({"head": head, "rest": rest, "again": again, "late_rest": late_rest,
                          "auto_shard_off": bool(got_off), "narrow_epochs": narrow_epochs,
                          "expected": expected, "cardinality": int(rest_ds.cardinality()),
                          "len": len(restored), "full": int(make(1).dataset().cardinality())}))
    """))
    got = report(run_bounded(s, within=120))
    assert got["head"] + got["rest"] == got["expected"][0]
    assert got["again"] == got["expected"][1]
    assert got["late_rest"] == got["rest"]
    assert got["full"] == got["len"] == 7
    # A whole epoch's, as for a dataset made before the restore: an unknown
    # cardinality would make Keras size every later epoch from the short rest.
    assert got["cardinality"] == got["len"] == 7
    assert got["narrow_epochs"] == [0, 2]
    assert got["auto_shard_off"], "a sharded dataset() must turn TensorFlow's auto-shard off"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


MULTI_HOST = """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    from mploader import MPLoader
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    loaders = []
    def dataset_fn(ctx):
        loader = MPLoader(lambda i: (np.full(3, i, np.float32), np.float32(i)), 41,
                          num_workers=1, shuffle=True, seed=4, shard=ctx)
        loaders.append(loader)
        return loader.dataset().batch(ctx.get_per_replica_batch_size(8))
    dist = strategy.distribute_datasets_from_function(dataset_fn)
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.SGD(0.001)
    @tf.function
    def train_step(batch):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((model(x)[:, 0] - y) ** 2) / 8.0
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return y
        return strategy.run(step, args=batch)
    seen = []
    for epoch in range(2):
        items, steps = [], 0
        for batch in dist:
            ys = strategy.experimental_local_results(train_step(batch))
            items += [int(v) for y in ys for v in y.numpy()]
            steps += 1
        seen.append({"items": items, "steps": steps})
    weights = [w.numpy().ravel().tolist() for w in model.trainable_variables]
    print(json.dumps({"seen": seen, "weights": weights, "len": len(loaders[0]),
                      "pids": [p for loader in loaders for p in loader.worker_pids()]}))
    for loader in loaders:
        loader.close()
"""


def test_two_hosts_with_multi_worker_mirrored_strategy_read_disjoint_equal_shards(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    path = tmp_path / "host.py"
    path.write_text(MULTI_HOST.replace("\n    ", "\n"))
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, str(path)], cwd=tmp_path, env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    hosts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert hosts[0]["len"] == hosts[1]["len"] == 20
    for epoch in range(2):
        a, b = (h["seen"][epoch] for h in hosts)
        assert a["steps"] == b["steps"] == 5   # 20 items, 4 per replica
        assert len(a["items"]) == len(b["items"]) == 20
        assert not set(a["items"]) & set(b["items"]), "the hosts read the same items"
        assert len(set(a["items"]) | set(b["items"])) == 40  # 41 less a tail of 1
    assert hosts[0]["seen"][0]["items"] != hosts[0]["seen"][1]["items"]
    assert hosts[0]["weights"] == hosts[1]["weights"]
    assert_no_worker_left([pid for h in hosts for pid in h["pids"]])


def test_model_fit_under_mirrored_strategy_on_two_cpu_devices(script):
    s = script(joined(PRELUDE, """
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        loader = MPLoader(sample, 40, num_workers=2, shuffle=True, seed=1)
        report_pids(loader)
        with strategy.scope():
            model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(1)])
            model.compile(tf.keras.optimizers.SGD(1e-4), "mse")
        history = model.fit(loader.dataset().batch(8), epochs=2, verbose=0,
                            callbacks=[loader.keras_callback()])
        print(json.dumps({"loss": history.history["loss"],
                          "replicas": strategy.num_replicas_in_sync,
                          "state": loader.state_dict()}))
        loader.close()
    """))
    got = report(run_bounded(s, within=120))
    assert got["replicas"] == 2 and len(got["loss"]) == 2
    assert all(loss == loss for loss in got["loss"])  # not NaN
    assert (got["state"]["epoch"], got["state"]["position"]) == (2, 0)
    assert_no_worker_left(s.wait_for_pids())


@pytest.mark.slow
def test_keras_steps_per_epoch_over_repeat_never_runs_an_order_twice(script):
    """A pass is 5 batches, a Keras epoch 7: the passes are epochs 0, 1, 2, ... (each
    its own order), and the callback names the pass it reports by the loader's number."""
    s = script(joined(PRELUDE, """
        def scalar(i):
            return np.float32(i)
        loader = MPLoader(scalar, 10, shuffle=True, seed=5, num_workers=1)
        report_pids(loader)
        seen = []
        ds = loader.dataset().map(lambda x: (tf.reshape(x, (1,)), tf.reshape(x, (1,)))).batch(2)
        model = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        model.fit(ds.repeat(), steps_per_epoch=7, epochs=3, verbose=0,
                  callbacks=[loader.keras_callback()])
        epochs = [r["epoch"] for r in loader.stats()["epochs"]]
        orders = []
        for e in sorted(set(epochs)):
            with MPLoader(scalar, 10, shuffle=True, seed=5, num_workers=1) as fresh:
                fresh.set_epoch(e)
                orders.append([float(x) for x in fresh])
        print(json.dumps({"epochs": epochs, "orders": orders}))
        loader.close()
    """))
    out = run_bounded(s, within=180)
    got = report(out)
    assert got["epochs"] == sorted(set(got["epochs"])) == list(range(len(got["epochs"])))
    assert len({tuple(o) for o in got["orders"]}) == len(got["orders"])
    printed = [int(line.split()[2].rstrip(":")) for line in out.stdout.splitlines()
               if line.startswith("mploader, epoch ")]
    assert len(printed) == 3 and set(printed) <= set(got["epochs"])
    assert_no_worker_left(s.wait_for_pids())


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_a_state_saved_in_a_keras_batch_callback_counts_exactly_the_batches_trained(
        script, steps_per_execution):
    """model.fit reads nothing ahead of the step here: after batch b of a
    Keras epoch, the position is (b + 1) batches further, across .repeat()."""
    s = script(joined(PRELUDE, f"""
        def pair(i):
            return np.full(4, i, np.float32), np.float32(i)
        loader = MPLoader(pair, 64, num_workers=2)
        report_pids(loader)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        model.compile("sgd", "mse", steps_per_execution={steps_per_execution})
        seen = []

        class Probe(tf.keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                state = loader.state_dict()
                seen.append((batch, state["epoch"], state["position"]))

        model.fit(loader.dataset().batch(2).repeat(), steps_per_epoch=8, epochs=2,
                  verbose=0, callbacks=[Probe(), loader.keras_callback()])
        print(json.dumps({{"seen": seen}}))
        loader.close()
    """))
    got = report(run_bounded(s, within=180))
    assert got["seen"], got
    for keras_epoch, chunk in enumerate((got["seen"][:len(got["seen"]) // 2],
                                         got["seen"][len(got["seen"]) // 2:])):
        for batch, epoch, position in chunk:
            assert (epoch, position) == (0, 2 * (8 * keras_epoch + batch + 1)), got
    assert_no_worker_left(s.wait_for_pids())


def test_set_epoch_while_tensorflow_holds_the_rest_of_a_pass_keeps_its_position(script):
    """The generator can read a pass to its end while the consumer has taken two
    elements (every result was ready): the pass goes on until they are taken, so
    set_epoch(1) then leaves the state inside epoch 0, and epoch 1 comes after."""
    s = script(joined(PRELUDE, """
        def scalar(i):
            return np.float32(i)
        loader = MPLoader(scalar, 8, num_workers=2, prefetch=4)
        report_pids(loader)
        # Both workers started before the first call, so it gives each its 4
        # tasks (a worker ready only after the first element came gets its
        # tasks at the next call, after the sleep: CI saw 2 per call then).
        time.sleep(2.0)
        it = iter(loader.dataset().repeat())
        taken = [float(next(it))]
        time.sleep(1.5)                 # all 8 ready: the next call takes them all
        taken.append(float(next(it)))
        per_call = loader.stats()["elements_per_tensorflow_call"]
        loader.set_epoch(1)
        mid = loader.state_dict()
        taken += [float(next(it)) for _ in range(6)]
        end = loader.state_dict()
        taken.append(float(next(it)))
        epochs = [r["epoch"] for r in loader.stats()["epochs"]]
        print(json.dumps({"per_call": per_call, "mid": mid, "end": end, "taken": taken,
                          "epochs": epochs}))
        loader.close()
    """))
    got = report(run_bounded(s, within=120))
    assert got["per_call"] > 2, got        # the premise: the pass's rest went in one call
    assert (got["mid"]["epoch"], got["mid"]["position"]) == (0, 2), got
    assert "next_epoch" not in got["mid"], got
    assert (got["end"]["epoch"], got["end"]["position"]) == (1, 0), got
    assert got["taken"][:8] == list(range(8)) and got["epochs"][:2] == [0, 1], got
    assert_no_worker_left(s.wait_for_pids())
