"""The tracking database at start-up (issue 11.1): half-migrated files are repaired or refused."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
from omegaconf import OmegaConf

from helpers import mlflow_runs

# Parallel first starts through the CLI: tests/test_soak.py (six runs started at once on a new file).


def half_migrated_database(path):
    """What a migration killed part-way leaves: the schema a few revisions behind, with the temporary
    table of the migration that was running (SQLite alters tables by copying them)."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    url = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(url)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "27a6a02d2cf1")  # model version tags; the next ones alter model_versions
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE _alembic_tmp_model_versions AS SELECT * FROM model_versions")
    engine.dispose()
    return url


def test_a_half_migrated_database_is_repaired_at_start_with_a_backup(tmp_path):
    from mlflow.tracking import MlflowClient

    from rlhf_exp.tracking.mlflow_tracker import MlflowTracker

    db = tmp_path / "mlflow.db"
    url = half_migrated_database(db)
    with pytest.raises(Exception, match="_alembic_tmp_model_versions already exists"):  # every run, before
        MlflowClient(tracking_uri=url).search_experiments()
    tracking = OmegaConf.create({"tracking_uri": url, "experiment_name": "rlhf_exp", "artifact_location": None})
    tracker = MlflowTracker(tracking, str(tmp_path))
    tracker.start("after-repair", {"a": 1}, {})
    tracker.finish("FINISHED")
    _, runs = mlflow_runs(db)
    assert [run.info.run_name for run in runs] == ["after-repair"]
    with closing(sqlite3.connect(db)) as conn:
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp%'").fetchall()
    assert len(list(tmp_path.glob("mlflow.db.bak-*"))) == 1  # the file as it was, kept


def test_a_database_that_cannot_be_repaired_is_refused_with_what_to_do(tmp_path):
    from rlhf_exp.errors import UserInputError
    from rlhf_exp.tracking.mlflow_tracker import MlflowTracker

    db = tmp_path / "mlflow.db"
    url = half_migrated_database(db)
    with closing(sqlite3.connect(db)) as conn:  # the revision row gone too: nothing says where it stopped
        conn.execute("DELETE FROM alembic_version")
        conn.commit()
    tracking = OmegaConf.create({"tracking_uri": url, "experiment_name": "rlhf_exp", "artifact_location": None})
    with pytest.raises(UserInputError, match=r"half-migrated .*mv .*mlflow.db .*mlflow.db.broken"):
        MlflowTracker(tracking, str(tmp_path))
