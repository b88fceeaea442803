import pytest

from lowmem_tune.errors import UserError
from lowmem_tune.profile import Profile, load_profile, profile_from_dict


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_defaults_and_round_trip(tmp_path):
    profile = load_profile(write(tmp_path, "model: {name: tiny-llama, init: random}\ntrain: {lr: 1e-4}\n"))
    assert profile.model.name == "tiny-llama"
    assert profile.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; we accept it
    again = profile_from_dict(Profile().to_dict() | {"model": profile.to_dict()["model"]})
    assert again.model.init == "random"


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(UserError, match=r"p.yaml: unknown key train.learning_rat.*") as err:
        load_profile(write(tmp_path, "train: {learning_rat: 1}\n"))
    assert "\n" not in str(err.value)


def test_did_you_mean_close_key(tmp_path):
    with pytest.raises(UserError, match=r"did you mean 'max_steps'"):
        load_profile(write(tmp_path, "train: {max_step: 1}\n"))


def test_bad_value_names_key(tmp_path):
    with pytest.raises(UserError, match=r"train.micro_batch_size: expected a whole number"):
        load_profile(write(tmp_path, "train: {micro_batch_size: four}\n"))
    with pytest.raises(UserError, match=r"strategy.name: 'galor' is not one of.*did you mean 'galore'"):
        load_profile(write(tmp_path, "strategy: {name: galor}\n"))
    with pytest.raises(UserError, match=r"train.lr: must be positive"):
        load_profile(write(tmp_path, "train: {lr: 0}\n"))


def test_overrides(tmp_path):
    path = write(tmp_path, "strategy: {name: galore}\n")
    profile = load_profile(path, ["strategy.name=fira", "train.max_steps=7", "eval.tasks=[boolq, piqa]"])
    assert profile.strategy.name == "fira"
    assert profile.train.max_steps == 7
    assert profile.eval.tasks == ["boolq", "piqa"]
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_profile(path, ["train.max_steps"])
    with pytest.raises(UserError, match="SECTION.KEY"):
        load_profile(path, ["max_steps=3"])


def test_switching_strategy_drops_the_default_strategys_keys_when_the_file_names_none(tmp_path):
    # No strategy.name in the file: it runs the default (galore), whose rank full does not read.
    path = write(tmp_path, "strategy: {rank: 32, update_proj_gap: 50}\n")
    notes: list[str] = []
    profile = load_profile(path, ["strategy.name=full"], notes)
    assert profile.strategy.name == "full"
    assert "strategy.rank" in notes[0] and "strategy.update_proj_gap" in notes[0]
    assert load_profile(path).strategy.rank == 32  # without --set the file's keys stand
    with pytest.raises(UserError, match="does not apply to strategy full"):
        load_profile(path, ["strategy.name=full", "strategy.rank=8"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="profile not found"):
        load_profile(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_profile(write(tmp_path, "model: [unclosed\n"))


def test_shipped_profiles_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no profiles/ here
    assert load_profile("demo").model.name == "demo-llama"
    assert load_profile("profiles/demo.yaml").strategy.name == "galore"
    with pytest.raises(UserError, match="ready profiles: .*demo"):
        load_profile("nope.yaml")


def test_data_dataset_reads_a_save_to_disk_directory_and_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    from lowmem_tune.data import load_examples
    from lowmem_tune.profile import DataSection

    rows = [{"question": f"is {i} even", "passage": f"{i} is a number.", "answer": i % 2 == 0} for i in range(6)]
    DatasetDict({"train": Dataset.from_list(rows[:4]), "validation": Dataset.from_list(rows[4:])}).save_to_disk(
        str(tmp_path / "saved"))
    train = load_examples(DataSection(dataset=str(tmp_path / "saved")))
    assert [e.response for e in train] == [" yes", " no", " yes", " no"]
    assert "is 0 even" in train[0].prompt
    validation = load_examples(DataSection(dataset=str(tmp_path / "saved"), split="validation"))
    assert len(validation) == 2
    with pytest.raises(UserError, match="no split 'test'.*train, validation"):
        load_examples(DataSection(dataset=str(tmp_path / "saved"), split="test"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a save_to_disk dataset"):
        load_examples(DataSection(dataset=str(tmp_path / "empty")))
