import json

import pytest

from cartformer.cli import build_parser, main, resolve_config


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_every_option_has_help():
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_run_options_reach_config(tmp_path):
    args = parse(
        "run",
        "--out",
        str(tmp_path),
        "--pretrain-epochs",
        "7",
        "--finetune-lr",
        "0.0005",
        "--embedding-dim",
        "32",
        "--max-history",
        "128",
        "--device",
        "cpu",
    )
    cfg = resolve_config(args)
    assert cfg.pretrain.max_epochs == 7
    assert cfg.finetune.lr == 0.0005
    assert cfg.pretrain.lr == 1e-3
    assert cfg.model.embedding_dim == 32
    assert cfg.data.max_history == 128
    assert cfg.model.max_seq_len == 128
    assert cfg.finetune.device == "cpu"


def test_saved_config_kept_for_missing_options(tmp_path):
    first = resolve_config(parse("finetune", "--out", str(tmp_path), "--lr", "0.002"))
    first.save(tmp_path / "config.json")
    second = resolve_config(parse("finetune", "--out", str(tmp_path), "--epochs", "3"))
    assert second.finetune.lr == 0.002
    assert second.finetune.max_epochs == 3


def test_missing_prepared_data_is_one_line_error(tmp_path, capsys):
    code = main(["pretrain", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "cartformer prepare" in err


def test_prepare_without_data_is_error(tmp_path, capsys):
    code = main(["prepare", "--out", str(tmp_path)])
    assert code == 2
    assert "--data" in capsys.readouterr().err


def test_config_written_by_stage(tmp_path):
    main(["prepare", "--out", str(tmp_path), "--min-history", "3"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data"]["min_history"] == 3


@pytest.mark.parametrize(
    "command", ["demo-data", "prepare", "pretrain", "finetune", "evaluate", "run", "ablation"]
)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: cartformer" in capsys.readouterr().out


def test_invalid_device_not_saved(tmp_path, capsys):
    code = main(["evaluate", "--out", str(tmp_path), "--device", "gpu"])
    assert code == 2
    assert "--device" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()


def test_data_path_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(parse("prepare", "--out", "run", "--data", "train.parquet"))
    assert cfg.data_path == str(tmp_path / "train.parquet")


def test_feature_options_reach_config(tmp_path):
    args = parse(
        "run",
        "--out",
        str(tmp_path),
        "--categorical-features",
        "--text-features",
        "--no-time-features",
        "--cross-layers",
        "1",
        "--utc-offset-hours",
        "5.5",
        "--tokenizer",
        "some/dir",
        "--text-vocab-size",
        "500",
    )
    cfg = resolve_config(args)
    assert cfg.model.use_categorical
    assert cfg.model.use_text
    assert not cfg.model.use_time
    assert cfg.model.cross_layers == 1
    assert cfg.model.utc_offset_hours == 5.5
    assert cfg.data.tokenizer == "some/dir"
    assert cfg.data.text_vocab_size == 500


def test_features_off_by_default(tmp_path):
    cfg = resolve_config(parse("run", "--out", str(tmp_path)))
    assert not (cfg.model.use_categorical or cfg.model.use_text or cfg.model.use_time)


def test_ablation_arm_names_match():
    from cartformer.ablation import ABLATION_ARMS
    from cartformer.cli import ABLATION_ARM_NAMES

    assert tuple(ABLATION_ARMS) == ABLATION_ARM_NAMES


def test_ablation_options_reach_config(tmp_path):
    args = parse(
        "ablation", "--out", str(tmp_path), "--pretrain-epochs", "2", "--arms", "id-only", "all"
    )
    cfg = resolve_config(args)
    assert cfg.pretrain.max_epochs == 2
    assert args.arms == ["id-only", "all"]


def test_invalid_utc_offset_not_saved(tmp_path, capsys):
    code = main(["pretrain", "--out", str(tmp_path), "--utc-offset-hours", "30"])
    assert code == 2
    assert "--utc-offset-hours" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()
