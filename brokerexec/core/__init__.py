"""The core: what runs a job, knowing nothing of how messages travel.

A job has two threads that meet at ``ready()``:

* the **handler thread** (a transport's) takes signals: :mod:`.handler_thread`;
* the **computation thread** runs the service: :mod:`.computation_thread`;
* between them, and nothing else: :mod:`.crossing`;
* the face of both, for the service and for the worker: :mod:`.service_handler`.

Around them: what users write (:mod:`.service`, with its :mod:`.inputs`), the job's state
(:mod:`.state_machine`) and periodic messages (:mod:`.intervals`), where computations run
(:mod:`.runner`, the interface; :mod:`.thread_runner`, the default), the pool behind
``handler.map`` (:mod:`.map_pool`) and which services may run (:mod:`.registry`). A runner
in a child process is :mod:`brokerexec.child`, above this package.
"""
