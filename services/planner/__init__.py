"""The planner service: workflow statistics + profiles -> ALP -> allocation search (issue 4)."""
