"""Soft committees (docs/methods.md section 6): ``inputs`` reads and checks the members' stored
probabilities, ``selection`` picks members on validation only (``CommitteeConfig``) and scores them
on test. The MLflow side (which runs, logging) lives in ``orchestrator.committees.command``.
"""
