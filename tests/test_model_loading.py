"""Which model files the server accepts, what it reports about them, and refusals.

Refused files are logged with the layer at fault and skipped; the server
starts with the models that stream.
"""

import logging

import keras
import numpy as np
import pytest

from seqserve.server import models as models_module
from seqserve.server import program as program_module
from seqserve.server.errors import ModelRefused
from seqserve.server.model_versions import load_model_dir
from seqserve.server.models import load_model_file

import zoo
from conftest import client_for, running_server
from keras_reference import state_parts

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"  # Keras 3.15's own save
)

# A few accepted models beside every refused one: enough to check what the
# server reports, few enough to load quickly.
SERVED = [
    "stacked",
    "embedding",
    "last_step",
    "td_frame_model",
    "nested_sequential",
    "legacy_h5",
    "stateful",
    "rnn_wrapper",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixed")
    built = zoo.save([*SERVED, *zoo.REFUSED, *zoo.REFUSED_WHOLE], directory)
    (directory / "garbage.keras").write_bytes(b"not a zip archive")
    (directory / "notes.txt").write_text("not a model; ignored")
    return directory, built


@pytest.fixture(scope="module")
def client(model_dir):
    with running_server(model_dir[0]) as app, client_for(app) as client:
        yield client


def path_of(directory, name):
    return directory / (name + zoo.ZOO[name].suffix)


def test_the_server_starts_with_the_models_that_stream(client):
    assert sorted(m.name for m in client.list_models()) == sorted(SERVED)


def test_list_models_reports_inputs_outputs_and_state_layout(client, model_dir):
    infos = {m.name: m for m in client.list_models()}
    built = model_dir[1]
    expected = {
        # name: (input dtype, input shape, output shape, per timestep, state)
        "stacked": (
            "float32",
            (-1, 3),
            (-1, 4),
            True,
            [
                ("lstm", "LSTM", "h", 8),
                ("lstm", "LSTM", "c", 8),
                ("gru", "GRU", "h", 6),
            ],
        ),
        "embedding": (
            "int32",
            (-1,),
            (-1, 3),
            True,
            [("lstm", "LSTM", "h", 6), ("lstm", "LSTM", "c", 6)],
        ),
        "last_step": (
            "float32",
            (-1, 3),
            (2,),
            False,
            [
                ("lstm", "LSTM", "h", 6),
                ("lstm", "LSTM", "c", 6),
                ("gru", "GRU", "h", 5),
            ],
        ),
        "td_frame_model": (
            "float32",
            (-1, 4, 2),
            (-1, 2),
            True,
            [("gru", "GRU", "h", 6)],
        ),
        "nested_sequential": (
            "float32",
            (-1, 3),
            (-1, 2),
            True,
            [
                ("encoder/lstm", "LSTM", "h", 6),
                ("encoder/lstm", "LSTM", "c", 6),
                ("gru", "GRU", "h", 5),
            ],
        ),
        "legacy_h5": (
            "float32",
            (-1, 3),
            (-1, 2),
            True,
            [
                ("lstm", "LSTM", "h", 5),
                ("lstm", "LSTM", "c", 5),
                ("rnn", "SimpleRNN", "h", 4),
            ],
        ),
        "stateful": (
            "float32",
            (-1, 3),
            (-1, 2),
            True,  # no fixed batch of 4
            [("lstm", "LSTM", "h", 6), ("lstm", "LSTM", "c", 6)],
        ),
        "rnn_wrapper": (
            "float32",
            (-1, 3),
            (-1, 3),
            True,
            [("rnn", "RNN", "h", 5), ("rnn", "RNN", "c", 5)],
        ),
    }
    for name, (dtype, in_shape, out_shape, per_timestep, state) in expected.items():
        info = infos[name]
        assert (info.input.dtype, info.input.shape) == (np.dtype(dtype), in_shape)
        input_layer = built[name].layers[0]
        assert isinstance(input_layer, keras.layers.InputLayer)
        assert info.input.name == input_layer.name
        assert [(o.name, o.dtype, o.shape) for o in info.outputs] == [
            (built[name].output_names[0], np.dtype("float32"), out_shape)
        ]
        assert info.outputs_per_timestep is per_timestep
        assert [(p.layer, p.layer_type, p.part, p.units) for p in info.state] == state


def test_the_state_layout_matches_the_keras_layers(client, model_dir):
    built = model_dir[1]
    for info in client.list_models():
        layers = {}
        for part in info.state:
            layers.setdefault(part.layer, []).append(part)
        for name, parts in layers.items():
            layer = built[info.name]
            for step in name.split("/"):
                layer = layer.get_layer(step)
            assert tuple(p.part for p in parts) == state_parts(layer)
            assert {p.units for p in parts} == {layer.cell.units}
            assert {p.layer_type for p in parts} == {type(layer).__name__}


@pytest.mark.parametrize("name", sorted(zoo.REFUSED))
def test_load_model_file_refuses_a_model_that_cannot_stream(name, model_dir):
    with pytest.raises(ModelRefused):
        load_model_file(path_of(model_dir[0], name), allow_unsafe=False)


@pytest.mark.parametrize("name", sorted(zoo.REFUSED))
def test_a_refusal_is_logged_with_the_layer_at_fault(name, model_dir, tmp_path, caplog):
    alone = tmp_path / path_of(model_dir[0], name).name
    alone.write_bytes(path_of(model_dir[0], name).read_bytes())

    with caplog.at_level(logging.ERROR, logger=models_module.__name__):
        assert load_model_dir(tmp_path, allow_unsafe=False) == {}

    refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1
    assert repr(zoo.REFUSED[name].refused_layer) in refusals[0].getMessage()


def test_outputs_of_both_kinds_are_refused(model_dir):
    # One output per timestep beside one on the returned state: neither every
    # step nor only the last has all the outputs.
    with pytest.raises(ModelRefused):
        load_model_file(path_of(model_dir[0], "mixed_heads"), allow_unsafe=False)


def test_a_file_keras_cannot_read_is_refused(model_dir):
    with pytest.raises(ModelRefused):
        load_model_file(model_dir[0] / "garbage.keras", allow_unsafe=False)


def test_a_lambda_model_loads_only_when_unsafe_loading_is_allowed(tmp_path):
    path = tmp_path / "with_lambda.keras"
    zoo.build("with_lambda").save(path)

    with pytest.raises(ModelRefused):
        load_model_file(path, allow_unsafe=False)
    served = load_model_file(path, allow_unsafe=True)
    assert [(p.layer, p.part) for p in served.state_parts] == [
        ("lstm", "h"),
        ("lstm", "c"),
    ]


def test_training_configuration_is_not_needed(tmp_path):
    path = tmp_path / "custom_compiled.keras"
    zoo.build("custom_compiled").save(path)

    with pytest.raises(TypeError):  # what compile=True makes of unknown functions
        keras.saving.load_model(path)
    assert load_model_file(path, allow_unsafe=False).outputs_per_timestep


def test_an_unforeseen_error_refuses_only_its_own_file(tmp_path, monkeypatch, caplog):
    zoo.save(["simple_rnn", "gru_reset_after"], tmp_path)
    real = models_module.ServedModel.self_check

    def self_check(served, *args, **kwargs):
        if served.name == "simple_rnn":
            raise RuntimeError("a bug nobody foresaw")
        return real(served, *args, **kwargs)

    monkeypatch.setattr(models_module.ServedModel, "self_check", self_check)
    with caplog.at_level(logging.ERROR, logger=models_module.__name__):
        loaded = load_model_dir(tmp_path, allow_unsafe=False)

    assert sorted(loaded) == ["gru_reset_after"]
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


def test_the_load_time_self_check_catches_a_wrong_step_program(tmp_path, monkeypatch):
    # Were masked steps at the start of a chunk to output zeros instead of the
    # previous output, the self-check must notice before any client does.
    zoo.save(["masking"], tmp_path)
    monkeypatch.setattr(
        program_module,
        "_continue_masked_output",
        lambda layer, mask, has_output, h, last, sequence: (last, sequence),
    )

    with pytest.raises(ModelRefused):
        load_model_file(tmp_path / "masking.keras", allow_unsafe=False)
