"""What a user sees while a job runs: a quiet console with live progress, and TensorBoard scalars.

    console.py   log levels / warnings of third-party libraries, Ray's init options, the driver's progress bars
    channel.py   a tiny Ray actor that carries progress records from rank 0 to the driver
    monitor.py   worker side (rank 0): TensorBoard scalars + progress records for one task
    tb.py        reading the event files back (TensorBoard's own reader) for the report's figures and tests
"""
