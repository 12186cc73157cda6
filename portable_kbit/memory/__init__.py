"""Measuring and forecasting memory: snapshots, live tensor bytes, the step forecast, the guard, the monitor."""
