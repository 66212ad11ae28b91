"""kvm-unit-tests on pykvmm: find and build the suite, read x86/unittests.cfg, run the tests
as QEMU's run_tests.sh would, and compare the results with a reference run."""
