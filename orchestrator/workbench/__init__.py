"""The tracking workbench: every MLflow read and write (``tracking``, ``spool``), the logged trial
Model, the analysis as logged (``analysis_log``), and what a person reads (``runs``, ``summary``,
``report``, ``figures``)."""
