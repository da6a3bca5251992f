"""Streaming through a real server equals Keras on the whole sequence at once.

One server serves every accepted model of the zoo. Each test streams sessions
through the client and compares outputs and states with Keras run offline on
the same weights (see keras_reference), in float32 with an absolute tolerance
of 1e-5.
"""

import threading

import keras
import numpy as np
import pytest

import zoo
from conftest import client_for, running_server
from keras_reference import Reference, state_parts

ATOL = 1e-5
LENGTH = 100
# Steps set to the mask value (0.0, or token 0): at the start of the sequence,
# at the start of the second chunk of the 37/63 split, mid-chunk, and last.
MASKED_STEPS = (0, 1, 2, 37, 38, 39, 55, 56, 57, 58, 99)
# One sequence and one state per model wherever a test allows, so that the
# reference's cache spares repeated Keras calls (eager ones take seconds).
SEQUENCE_SEED, STATE_SEED = 2, 4
PER_SEQUENCE = {"last_step", "state_head"}  # the head sees only the last step
CHAINED = [name for name in zoo.ACCEPTED if name not in zoo.BRANCHED]
CHUNKINGS = ["one_step", "37_63", "random", "whole"]

pytestmark = [
    # Raised inside model.save by Keras 3.15 with numpy 2; nothing to act on.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # Keras 3.15 warns that a nested model destroys the mask, yet its output
    # keeps it and the next layer uses it (and the server matches that).
    pytest.mark.filterwarnings("ignore:Layer 'encoder':UserWarning"),
]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def zoo_models(zoo_dir) -> dict[str, keras.Model]:
    return zoo.save(zoo.ACCEPTED, zoo_dir)


# Every test runs on each execution path: "auto" picks NumPy for the plain
# stacks that it supports, "tensorflow" never does; and with the states kept in
# TensorFlow variables, as on a GPU.
@pytest.fixture(
    scope="module",
    params=[("auto", "host"), ("tensorflow", "host"), ("tensorflow", "tensorflow")],
    ids=["auto", "tensorflow", "tensorflow-states"],
)
def app(request, zoo_dir, zoo_models):
    execution, state_storage = request.param
    settings = {
        "allow_unsafe_deserialization": True,
        "execution": execution,
        "state_storage": state_storage,
    }
    with running_server(zoo_dir, **settings) as app:
        yield app


@pytest.fixture(scope="module")
def client(app):
    with client_for(app) as client:
        yield client


@pytest.fixture(scope="module")
def references(zoo_models) -> dict[str, Reference]:
    return {name: Reference(zoo_models[name]) for name in zoo.ACCEPTED}


def length_of(name: str) -> int:
    return zoo.FIXED_LENGTH if name == "fixed_length" else LENGTH


def sequence(reference: Reference, length: int, seed: int, masked=MASKED_STEPS):
    """One session's input [length, ...] with the mask value at `masked` steps."""
    spec = reference.model.inputs[0]
    rng = np.random.default_rng(seed)
    shape = (length, *spec.shape[2:])
    if "int" in spec.dtype:
        x = rng.integers(1, zoo.VOCABULARY, size=shape).astype(spec.dtype)
    else:
        x = rng.standard_normal(shape).astype(spec.dtype)
    x[[t for t in masked if t < length]] = 0
    return x


def random_state(reference: Reference, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        name: {
            part: rng.normal(0.0, 0.5, layer.cell.units).astype(np.float32)
            for part in state_parts(layer)
        }
        for name, layer in reference.rnns.items()
    }


def chunk_lengths(chunking: str, length: int, seed: int = 7) -> list[int]:
    if chunking == "one_step":
        return [1] * length
    if chunking == "37_63":
        return [37, length - 37]
    if chunking == "whole":
        return [length]
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < length:
        lengths.append(int(min(rng.integers(1, 17), length - sum(lengths))))
    return lengths


def stream(session, x, lengths, first_state=None):
    """Steps x chunk by chunk; returns each chunk's outputs and the final state."""
    outputs, start = [], 0
    for index, count in enumerate(lengths):
        state = first_state if index == 0 else None
        out, final = session.step_with_state(x[start : start + count], state=state)
        outputs.append(out)
        start += count
    return outputs, final


def assert_outputs(name, streamed, lengths, keras_until):
    """`keras_until(t)`: Keras' outputs for the first t steps, in one call.

    A per-timestep model is checked with one call on the whole sequence; a head
    that sees only the last step, with one call per chunk end.
    """
    if name not in PER_SEQUENCE:
        expected = keras_until(sum(lengths))
        np.testing.assert_allclose(
            np.concatenate(streamed), expected, atol=ATOL, rtol=0
        )
        return
    for end, out in zip(np.cumsum(lengths), streamed):
        np.testing.assert_allclose(out, keras_until(end), atol=ATOL, rtol=0)


def assert_state(actual: dict, expected: dict) -> None:
    assert {k: sorted(v) for k, v in actual.items()} == {
        k: sorted(v) for k, v in expected.items()
    }
    for layer, parts in expected.items():
        for part, value in parts.items():
            np.testing.assert_allclose(actual[layer][part], value, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CHAINED)
def test_the_layer_replay_equals_one_model_call(name, references):
    # Guards the reference itself: its twins must compute what the model does.
    reference = references[name]
    x = sequence(reference, length_of(name), SEQUENCE_SEED)
    replayed, _ = reference.replay(x)
    np.testing.assert_allclose(replayed, reference.outputs(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("name", CHAINED)
def test_streaming_equals_keras_on_the_whole_sequence(
    name, chunking, client, references
):
    reference = references[name]
    x = sequence(reference, length_of(name), SEQUENCE_SEED)
    lengths = chunk_lengths(chunking, len(x))

    with client.start_session(name) as session:
        streamed, state = stream(session, x, lengths)

    assert_outputs(name, streamed, lengths, lambda t: reference.outputs(x[:t]))
    assert_state(state, reference.replay(x)[1])


def start_with_state(client, name, state, x_other):
    return client.start_session(name, state=state), None


def set_state_after_steps(client, name, state, x_other):
    session = client.start_session(name)
    session.step(x_other)
    session.set_state(state)
    return session, None


def state_with_the_first_step(client, name, state, x_other):
    session = client.start_session(name)
    session.step(x_other)
    return session, state


@pytest.mark.parametrize(
    "how", [start_with_state, set_state_after_steps, state_with_the_first_step]
)
@pytest.mark.parametrize("name", CHAINED)
def test_an_explicit_state_equals_keras_initial_state(name, how, client, references):
    reference = references[name]
    x = sequence(reference, length_of(name), SEQUENCE_SEED)
    state = random_state(reference, STATE_SEED)
    lengths = chunk_lengths("random", len(x), seed=5)

    session, first_state = how(client, name, state, sequence(reference, 9, seed=6))
    with session:
        streamed, final = stream(session, x, lengths, first_state)

    assert_outputs(name, streamed, lengths, lambda t: reference.replay(x[:t], state)[0])
    assert_state(final, reference.replay(x, initial_state=state)[1])


@pytest.mark.parametrize("name", CHAINED)
def test_the_state_after_k_steps_equals_keras_return_state(name, client, references):
    reference = references[name]
    x = sequence(reference, length_of(name), SEQUENCE_SEED)[:37]

    with client.start_session(name) as session:
        session.step(x[:13])
        session.step(x[13:])
        state = session.get_state()

    expected = reference.replay(x)[1]
    assert_state(state, expected)
    for parts in expected.values():  # else a swap of h and c could go unseen
        assert "c" not in parts or not np.allclose(parts["h"], parts["c"], atol=1e-3)


@pytest.mark.parametrize("how", ["reset_call", "reset_with_step"])
@pytest.mark.parametrize("name", CHAINED)
def test_a_reset_session_equals_a_fresh_one(name, how, client, references):
    reference = references[name]
    x = sequence(reference, length_of(name), SEQUENCE_SEED)
    rest = chunk_lengths("random", len(x) - 20)
    state = random_state(reference, STATE_SEED)

    with client.start_session(name, state=state) as session:
        session.step(sequence(reference, 11, seed=11))
        if how == "reset_call":
            session.reset()
            first = session.step(x[:20])
        else:
            first = session.step(x[:20], reset=True)
        streamed, state = stream(session, x[20:], rest)

    assert_outputs(
        name, [first, *streamed], [20, *rest], lambda t: reference.outputs(x[:t])
    )
    assert_state(state, reference.replay(x)[1])


@pytest.mark.parametrize("name", ["masking", "embedding"])
def test_masked_steps_repeat_the_previous_output(name, client, references):
    reference = references[name]
    x = sequence(reference, LENGTH, SEQUENCE_SEED)

    with client.start_session(name) as session:
        streamed = np.concatenate(stream(session, x, [1] * LENGTH)[0])

    np.testing.assert_allclose(streamed, reference.outputs(x), atol=ATOL, rtol=0)
    for t in MASKED_STEPS[3:]:  # after the first unmasked step
        previous = max(s for s in range(t) if s not in MASKED_STEPS)
        np.testing.assert_array_equal(streamed[t], streamed[previous])


@pytest.mark.parametrize("chunking", ["one_step", "37_63"])
@pytest.mark.parametrize("name", ["masking", "embedding"])
def test_a_masked_start_from_a_given_state_equals_keras(
    name, chunking, client, references
):
    # Keras keeps the given state through masked first steps, but outputs as
    # if the previous output were zeros; the state shows only once unmasked.
    reference = references[name]
    x = sequence(reference, LENGTH, SEQUENCE_SEED)
    state = random_state(reference, STATE_SEED)

    with client.start_session(name, state=state) as session:
        streamed, final = stream(session, x, chunk_lengths(chunking, LENGTH))

    expected, expected_state = reference.replay(x, initial_state=state)
    from_zeros, _ = reference.replay(x)
    np.testing.assert_allclose(expected[:3], from_zeros[:3], atol=ATOL, rtol=0)
    assert not np.allclose(expected[3], from_zeros[3], atol=1e-3)
    np.testing.assert_allclose(np.concatenate(streamed), expected, atol=ATOL, rtol=0)
    assert_state(final, expected_state)


@pytest.mark.parametrize("name", ["stateful", "fixed_length"])
def test_sessions_of_saved_fixed_shapes_start_from_zeros(name, client, references):
    reference = references[name]
    x = sequence(reference, length_of(name), SEQUENCE_SEED)
    expected = reference.outputs(x)

    for lengths in ([7, 30, len(x) - 37], chunk_lengths("random", len(x), seed=16)):
        with client.start_session(name) as session:
            for parts in session.get_state().values():
                for value in parts.values():
                    np.testing.assert_array_equal(value, 0.0)
            streamed, _ = stream(session, x, lengths)
        np.testing.assert_allclose(
            np.concatenate(streamed), expected, atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("chunking", ["one_step", "37_63", "random"])
@pytest.mark.parametrize("name", zoo.BRANCHED)
def test_a_branched_model_streams_like_keras(name, chunking, client, references):
    # No chain to replay: only the outputs of one model call are compared.
    reference = references[name]
    x = sequence(reference, LENGTH, SEQUENCE_SEED)
    lengths = chunk_lengths(chunking, LENGTH)

    with client.start_session(name) as session:
        streamed, _ = stream(session, x, lengths)

    assert_outputs(name, streamed, lengths, lambda t: reference.outputs(x[:t]))


def test_the_state_a_head_reads_equals_keras_return_state(client, zoo_models):
    model = zoo_models["state_head"]
    x = sequence(Reference(model), LENGTH, SEQUENCE_SEED)

    with client.start_session("state_head") as session:
        _, state = stream(session, x, chunk_lengths("random", LENGTH))

    returned = keras.Model(model.inputs[0], model.get_layer("lstm").output)(x[None])
    h, c = (np.asarray(s)[0] for s in returned[1:])
    assert_state(state, {"lstm": {"h": h, "c": c}})


def test_concurrent_sessions_are_each_exact(app, client, references):
    name, sessions = "stacked", 6
    reference = references[name]
    xs = [sequence(reference, 40, seed=100 + i) for i in range(sessions)]
    results = [None] * sessions
    barrier = threading.Barrier(sessions)

    def run(index):
        with client.start_session(name) as session:
            barrier.wait()  # step together, so that the server batches them
            results[index] = stream(session, xs[index], [1] * 40)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for x, (streamed, state) in zip(xs, results):
        np.testing.assert_allclose(
            np.concatenate(streamed), reference.outputs(x), atol=ATOL, rtol=0
        )
        assert_state(state, reference.replay(x)[1])


def test_one_trace_serves_every_chunk_length_and_batch(app, client, references):
    # A retrace per chunk length would cost the first step of every new length.
    reference = references["stacked"]
    program = app.core.models["stacked"]._program  # the TensorFlow path
    traces = program.run.experimental_get_tracing_count()
    x = sequence(reference, LENGTH, seed=18)

    with client.start_session("stacked") as session:
        stream(session, x, chunk_lengths("random", LENGTH, seed=19))

    assert traces == 1
    assert program.run.experimental_get_tracing_count() == 1
