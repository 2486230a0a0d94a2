fn main() -> std::process::ExitCode {
    prism_messaging::cli::run()
}
