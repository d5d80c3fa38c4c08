"""admission: a task's rate limit and concurrency cap, shared by every worker.

``limits`` (what a task declares, checked at import), ``stores`` (the shared
state: Redis or SQL), ``gate`` (what a run does before its body: take, wait,
give back).
"""
