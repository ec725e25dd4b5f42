//! placeholder
#[test]
fn bench_optimizer() {}
