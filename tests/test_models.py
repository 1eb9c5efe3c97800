"""fer_tune.models: shapes, the paper's parameter count, the registry, local weights."""

import pytest
import torch
import torchvision

from fer_tune.common import FerTuneError
from fer_tune.config import TrainConfig
from fer_tune.models import MODELS, VggVariant, count_params, create_model, model_table

torch.set_num_threads(1)
PAPER_PARAMS = 29_890_759


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name):
    torch.manual_seed(0)
    model = create_model(name, dropout=0.3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 40, 40))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    TrainConfig(model=name)  # the config accepts every registered name


def test_vgg_variant_matches_paper():
    model = create_model("vgg_variant", dropout=0.4)
    assert count_params(model) == PAPER_PARAMS
    assert model.lin1.in_features == 512 * 2 * 2 and model.lin3.out_features == 7
    assert model.drop.p == 0.4
    # same state_dict keys as usef-kh/fer models/vgg.py, so its checkpoints load directly
    keys = {k.split(".")[0] for k in model.state_dict()}
    assert keys == {f"{m}{s}{h}" for m in ("conv", "bn") for s in "1234" for h in "ab"} | {"lin1", "lin2", "lin3"}
    model.train()
    assert model(torch.randn(2, 1, 40, 40)).shape == (2, 7)


def test_vgg_variant_width():
    small = create_model("vgg_variant", width=0.25)
    assert count_params(small) < PAPER_PARAMS / 10
    assert small.conv1a.out_channels == 16 and small.lin1.out_features == 1024
    assert create_model("vgg_variant", width=0.001).conv1a.out_channels == 1  # min 1
    assert small(torch.randn(2, 1, 40, 40)).shape == (2, 7)


def test_model_table():
    table = model_table()
    assert [row["name"] for row in table] == list(MODELS)
    params = {row["name"]: row["params"] for row in table}
    assert params["vgg_variant"] == PAPER_PARAMS
    assert all(isinstance(n, int) and n > 1_000_000 for n in params.values())


def test_unknown_model_and_width_errors():
    with pytest.raises(FerTuneError, match="unknown model 'alexnet'.*vgg_variant"):
        create_model("alexnet")
    with pytest.raises(FerTuneError, match="width"):
        create_model("resnet50", width=0.5)


def test_vgg_variant_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    tiny = VggVariant(width=0.0625)
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    loaded = create_model("vgg_variant", width=0.0625, weights=str(path))
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"params": tiny.state_dict(), "logs": {}}, tmp_path / "ref.pt")  # usef-kh/fer checkpoint layout
    assert torch.equal(
        create_model("vgg_variant", width=0.0625, weights=str(tmp_path / "ref.pt")).lin3.weight, tiny.lin3.weight
    )
    with pytest.raises(FerTuneError, match="does not fit"):
        create_model("vgg_variant", width=0.125, weights=str(path))


def test_torchvision_weights_adapted(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.resnet50(weights=None)  # the 3-channel, 1000-class ImageNet architecture
    path = tmp_path / "resnet50.pt"
    torch.save(original.state_dict(), path)
    model = create_model("resnet50", weights=str(path))
    assert model.conv1.in_channels == 1
    assert torch.allclose(model.conv1.weight, original.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[2].conv3.weight, original.layer4[2].conv3.weight)
    assert torch.equal(model.bn1.running_var, original.bn1.running_var)
    assert model.fc.out_features == 7
    model.eval()
    assert model(torch.randn(2, 1, 40, 40)).shape == (2, 7)


def test_bad_weights_files(tmp_path):
    with pytest.raises(FerTuneError, match="does not exist"):
        create_model("vgg_variant", weights=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(FerTuneError, match="cannot be read"):
        create_model("efficientnet_b3", weights=str(junk))
    torch.save({"fc.weight": torch.zeros(7, 3)}, tmp_path / "wrong.pt")
    with pytest.raises(FerTuneError, match="does not fit"):
        create_model("efficientnet_b3", weights=str(tmp_path / "wrong.pt"))


def test_the_parameter_count_a_driver_reckons_without_torch_is_the_models():
    """fer_tune.config.model_parameters (the free-space estimate before a study) against the built models."""
    from fer_tune.config import TORCHVISION_PARAMS, model_parameters
    from fer_tune.models import count_params, create_model

    for width in (1.0, 0.5, 0.3, 0.0625):
        assert model_parameters("vgg_variant", width) == count_params(create_model("vgg_variant", width=width))
    for name, n in TORCHVISION_PARAMS.items():
        with torch.device("meta"):
            assert count_params(create_model(name)) == n, name
