//! `dmfabric`: the one binary (its commands live in the library, `lib.rs`).

fn main() -> std::process::ExitCode {
    dmfabric::main()
}
