"""The search: Optuna samples SMSKD plans define-by-run, Ray Tune runs them, ASHA prunes by stage.

Importing this package does not import Ray; :func:`run_search` does, when it starts a search.
"""

from smskd_search.search.confirm import Confirmed, ConfirmSettings
from smskd_search.search.leaderboard import LeaderboardRow, rank_trials
from smskd_search.search.progress import ProgressInfo
from smskd_search.search.runner import SearchSummary, run_search
from smskd_search.search.sampling import Baseline, baseline_plans, plan_from_params, suggest_plan
from smskd_search.search.storage import StudyInfo, list_studies
from smskd_search.search.trial_report import TrialReport
from smskd_search.search_settings import SearchSettings

__all__ = [
    "Baseline",
    "ConfirmSettings",
    "Confirmed",
    "LeaderboardRow",
    "ProgressInfo",
    "SearchSettings",
    "SearchSummary",
    "StudyInfo",
    "TrialReport",
    "baseline_plans",
    "list_studies",
    "plan_from_params",
    "rank_trials",
    "run_search",
    "suggest_plan",
]
