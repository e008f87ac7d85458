"""The reward model's pyfunc as MLflow's models-from-code want it: a file that names the model (logged_models.py
passes this path to `mlflow.pyfunc.save_model`, so the model is code, not a pickle). Never imported here."""

from mlflow.models import set_model

from rlhf_exp.tracking.logged_models import RewardScorer

set_model(RewardScorer())
