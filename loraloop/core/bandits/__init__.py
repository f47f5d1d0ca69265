"""Per-user contextual bandits over operator-defined response strategies (arms).

The server chooses an arm per request (`choose`) and logs the choice's propensity; the
learner updates the statistics from joined rewards (`ArmStats.update`) and publishes them;
the server reads them back. Both sides share these modules.
"""
