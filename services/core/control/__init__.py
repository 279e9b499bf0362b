"""The control loop's decisions: when to re-plan a running deployment, and why (issue 12).

Pure code with the clock passed in: ``window`` keeps the last seconds of the router's trace and
reduces them to statistics per workflow; ``loop`` compares them (and the live nodes) with the
current plan, applies hysteresis, the minimum interval, pause and pin, and returns a
``Decision``; ``respec`` writes the spec a re-plan is made from; ``moves`` compares two
placements. The planner service (``services.planner.loop``) does the I/O around it.
"""
