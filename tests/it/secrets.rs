//! Secrets never come from a flag and never show: every binary's `--help`
//! with secrets in the environment twins, flags that carry one refused with
//! where to put it, and a Redis password read from a file.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "hunter2-do-not-print";

fn binaries() -> [(&'static str, &'static str); 11] {
    [
        ("producer", env!("CARGO_BIN_EXE_producer")),
        ("consumer", env!("CARGO_BIN_EXE_consumer")),
        ("replay", env!("CARGO_BIN_EXE_replay")),
        ("record", env!("CARGO_BIN_EXE_record")),
        ("latest", env!("CARGO_BIN_EXE_latest")),
        ("digest", env!("CARGO_BIN_EXE_digest")),
        ("doctor", env!("CARGO_BIN_EXE_doctor")),
        ("bench", env!("CARGO_BIN_EXE_bench")),
        ("crashtest", env!("CARGO_BIN_EXE_crashtest")),
        ("gen", env!("CARGO_BIN_EXE_gen")),
        ("hostile", env!("CARGO_BIN_EXE_hostile")),
    ]
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn help_shows_no_secret_from_the_environment() {
    for (name, binary) in binaries() {
        let output = Command::new(binary)
            .arg("--help")
            .env("CRYPTOPULSE_KAFKA_PROPERTIES", format!("sasl.username=alice;sasl.password={SECRET}"))
            .env("CRYPTOPULSE_REDIS_URL", format!("redis://:{SECRET}@127.0.0.1:6379"))
            .output()
            .expect("binary");
        assert!(output.status.success(), "{name} --help: {}", text(&output));
        assert!(!text(&output).contains(SECRET), "{name} --help prints a secret:\n{}", text(&output));
    }
}

#[test]
fn secrets_given_as_flags_are_refused_with_where_to_put_them() {
    let kafka = ["-X", "sasl.password=hunter2-do-not-print"];
    let redis = ["--redis-url", "redis://:hunter2-do-not-print@127.0.0.1:6379"];
    let cases: [(&str, &[&str], &str); 4] = [
        (env!("CARGO_BIN_EXE_consumer"), &kafka, "CRYPTOPULSE_KAFKA_CONFIG_FILE"),
        (env!("CARGO_BIN_EXE_doctor"), &kafka, "CRYPTOPULSE_KAFKA_CONFIG_FILE"),
        (env!("CARGO_BIN_EXE_consumer"), &redis, "CRYPTOPULSE_REDIS_PASSWORD_FILE"),
        (env!("CARGO_BIN_EXE_latest"), &redis, "CRYPTOPULSE_REDIS_PASSWORD_FILE"),
    ];
    for (binary, args, fix) in cases {
        let output = Command::new(binary).args(args).output().expect("binary");
        let shown = text(&output);
        assert_eq!(output.status.code(), Some(2), "{binary} {args:?}: {shown}");
        assert!(shown.contains(fix) && shown.contains("command line"), "{binary} {args:?}: {shown}");
        assert!(!shown.contains(SECRET), "{binary} {args:?} echoes the secret: {shown}");
    }
}

/// A redis-server of this test's own that wants a password.
struct GuardedRedis {
    child: Child,
    port: u16,
}

impl GuardedRedis {
    fn start(password: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new("redis-server")
            .args(["-", "--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/services)");
        // The password on its standard input, not its command line.
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "requirepass {password}").unwrap();
        drop(stdin);
        let started = Instant::now();
        while TcpListener::bind(("127.0.0.1", port)).is_ok() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server on {port} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        GuardedRedis { child, port }
    }
}

impl Drop for GuardedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_redis_password_comes_from_a_file_and_a_wrong_one_is_a_clear_error() {
    let redis = GuardedRedis::start(SECRET);
    let dir = tempfile::tempdir().unwrap();
    let latest = |password: &str| {
        let file = dir.path().join("password");
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_latest"))
            .args(["--redis-url", &format!("redis://127.0.0.1:{}", redis.port), "--redis-prefix", "secrets-test"])
            .env_remove("CRYPTOPULSE_REDIS_PASSWORD")
            .env("CRYPTOPULSE_REDIS_PASSWORD_FILE", &file)
            .output()
            .expect("latest");
        (output, started.elapsed())
    };
    let (output, _) = latest(SECRET);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("no symbols under secrets-test"), "{}", text(&output));

    let (output, took) = latest("wrong");
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("refused the credentials") && shown.contains("CRYPTOPULSE_REDIS_PASSWORD_FILE"), "{shown}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(!shown.contains(SECRET), "{shown}");
}

/// A CA, a server certificate for 127.0.0.1 signed by it, a client
/// certificate signed by it, and a second CA that signed nothing here.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(output.status.success(), "openssl {args:?}: {}", text(&output));
    };
    for ca in ["ca", "other-ca"] {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ]);
    }
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            &format!("{name}.crt"),
        ]);
    }
}

/// A redis-server of this test's own on TLS only, asking clients for a
/// certificate when `clients` is true.
fn tls_redis(dir: &std::path::Path, clients: bool) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let file = |name: &str| dir.join(name).display().to_string();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-cert-file", &file("server.crt"), "--tls-key-file", &file("server.key"), "--tls-ca-cert-file", &file("ca.crt")])
        .args(["--tls-auth-clients", if clients { "yes" } else { "no" }])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (Debian's is built with TLS)");
    let started = Instant::now();
    while TcpListener::bind(("127.0.0.1", port)).is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "redis-server on {port} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// `latest` against `url` with `env`; its output and how long it took.
fn latest_with(url: &str, env: &[(&str, std::path::PathBuf)]) -> (Output, Duration) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_latest"));
    command.args(["--redis-url", url, "--redis-prefix", "tls-test"]);
    for var in ["CRYPTOPULSE_REDIS_CA_FILE", "CRYPTOPULSE_REDIS_CERT_FILE", "CRYPTOPULSE_REDIS_KEY_FILE", "CRYPTOPULSE_REDIS_PASSWORD"] {
        command.env_remove(var);
    }
    for (var, value) in env {
        command.env(var, value);
    }
    let started = Instant::now();
    let output = command.output().expect("latest");
    (output, started.elapsed())
}

#[test]
fn rediss_checks_the_server_against_the_given_ca_and_fails_clearly_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (mut server, port) = tls_redis(dir.path(), false);
    let url = format!("rediss://127.0.0.1:{port}");
    let ca = ("CRYPTOPULSE_REDIS_CA_FILE", dir.path().join("ca.crt"));

    let (output, _) = latest_with(&url, std::slice::from_ref(&ca));
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("no symbols under tls-test"), "{}", text(&output));

    // A CA that did not sign the server's certificate, and plain text to the TLS port.
    let other = [("CRYPTOPULSE_REDIS_CA_FILE", dir.path().join("other-ca.crt"))];
    let plain = format!("redis://127.0.0.1:{port}");
    for (what, url, env, says) in [
        ("untrusted", url.as_str(), &other[..], "CRYPTOPULSE_REDIS_CA_FILE"),
        ("plain text", plain.as_str(), &[ca.clone()][..], "rediss://"),
    ] {
        let (output, took) = latest_with(url, env);
        assert!(!output.status.success(), "{what}: {}", text(&output));
        assert!(text(&output).contains(says), "{what}: {}", text(&output));
        assert!(took < Duration::from_secs(15), "{what}: took {took:?}");
    }
    let _ = server.kill();
    let _ = server.wait();

    // A server that asks for a client certificate gets one.
    let (mut server, port) = tls_redis(dir.path(), true);
    let url = format!("rediss://127.0.0.1:{port}");
    let client = [
        ca.clone(),
        ("CRYPTOPULSE_REDIS_CERT_FILE", dir.path().join("client.crt")),
        ("CRYPTOPULSE_REDIS_KEY_FILE", dir.path().join("client.key")),
    ];
    let (output, _) = latest_with(&url, &client);
    assert!(output.status.success(), "{}", text(&output));
    let (output, took) = latest_with(&url, std::slice::from_ref(&ca));
    assert!(!output.status.success() && took < Duration::from_secs(15), "no client certificate: {} after {took:?}", text(&output));
    let _ = server.kill();
    let _ = server.wait();
}

/// The commands the consumer needs, for an ACL user of its own: connecting,
/// the layout key and symbols set, and the write script (EVALSHA, loaded
/// once by SCRIPT LOAD) with the commands it calls. docs/security.md gives
/// the same line.
const CONSUMER_COMMANDS: &str = "-@all +ping +hello +auth +get +set +sadd +evalsha +script|load \
     +exists +hexists +hget +hset +hmget +del +xadd +xlen +xrevrange +xtrim +zadd +zcard +zremrangebyscore";

/// A redis-server of this test's own: TLS only, client certificates
/// required, the default user off, and users `pipeline` (keys `prefix:*`)
/// and `elsewhere` (keys `elsewhere:*`) with the consumer's commands and
/// password `password`; a plain port for `inspector` (password `password`,
/// every key, read commands only) to look with.
fn acl_redis(dir: &std::path::Path, prefix: &str, password: &str) -> (Child, u16, u16) {
    let [tls, plain] = [0, 0].map(|_| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let file = |name: &str| dir.join(name).display().to_string();
    let mut child = Command::new("redis-server")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (Debian's is built with TLS)");
    // The configuration, passwords included, on its standard input.
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    let config = format!(
        "port {plain}\ntls-port {tls}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n\
         tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients yes\n\
         user default off\n\
         user pipeline on >{password} resetkeys ~{prefix}:* resetchannels {CONSUMER_COMMANDS}\n\
         user elsewhere on >{password} resetkeys ~elsewhere:* resetchannels {CONSUMER_COMMANDS}\n\
         user inspector on >{password} ~* -@all +@read +@connection +type +scan\n",
        file("server.crt"),
        file("server.key"),
        file("ca.crt")
    );
    stdin.write_all(config.as_bytes()).unwrap();
    drop(stdin);
    let started = Instant::now();
    while [tls, plain].iter().any(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok()) {
        assert!(started.elapsed() < Duration::from_secs(10), "redis-server on {tls}/{plain} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, tls, plain)
}

/// The fixtures through Kafka to a Redis over TLS with a client certificate,
/// as an ACL user that may only touch the prefix's keys with the consumer's
/// commands: the plain run's digest. A wrong CA, a wrong password and a user
/// whose keys are elsewhere each fail within 15 s with a message saying
/// what to check, and the password shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_writes_to_redis_over_tls_as_an_acl_user_limited_to_its_keys() {
    let expected = crate::common::Lane::undisturbed("secrets-acl-plain").await;
    let lane = crate::common::Lane::new("secrets-acl");
    lane.replay(None, None).await;
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (mut server, tls, plain) = acl_redis(dir.path(), &lane.name, SECRET);
    let password = dir.path().join("password");
    let wrong = dir.path().join("wrong");
    std::fs::write(&password, SECRET).unwrap();
    std::fs::write(&wrong, "wrong-redis-password").unwrap();
    let consume = |user: &str, ca: &str, password: &std::path::Path| {
        let state = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_consumer"))
            .args(["--brokers", &lane.kafka.brokers, "--topic", &lane.kafka.topic, "--dlq-topic", &lane.kafka.dlq_topic])
            .args(["--group-id", &format!("{}-group", lane.name), "--redis-prefix", &lane.name, "--exit-at-end"])
            .args(["--redis-retry-secs", "5"])
            .arg("--state-dir")
            .arg(state.path())
            .env("CRYPTOPULSE_REDIS_URL", format!("rediss://{user}@127.0.0.1:{tls}"))
            .env_remove("CRYPTOPULSE_REDIS_PASSWORD")
            .env("CRYPTOPULSE_REDIS_PASSWORD_FILE", password)
            .env("CRYPTOPULSE_REDIS_CA_FILE", dir.path().join(ca))
            .env("CRYPTOPULSE_REDIS_CERT_FILE", dir.path().join("client.crt"))
            .env("CRYPTOPULSE_REDIS_KEY_FILE", dir.path().join("client.key"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("consumer");
        (output, started.elapsed())
    };

    let (output, _) = consume("pipeline", "ca.crt", &password);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains(SECRET), "{}", text(&output));
    let inspect = format!("redis://inspector:{SECRET}@127.0.0.1:{plain}");
    let mut conn = cryptopulse::sink::connect(&inspect).await.expect("redis");
    let written = cryptopulse::tooling::digest::digest(&mut conn, &lane.name).await.expect("digest");
    assert_eq!((written.sha256.as_str(), written.keys), (expected.sha256.as_str(), expected.keys), "Redis differs from the plain run's");
    assert!(!written.dump.contains(SECRET));

    for (what, user, ca, password, says) in [
        ("an untrusted server", "pipeline", "other-ca.crt", &password, "CRYPTOPULSE_REDIS_CA_FILE"),
        ("a wrong password", "pipeline", "ca.crt", &wrong, "CRYPTOPULSE_REDIS_PASSWORD"),
        ("a user whose keys are elsewhere", "elsewhere", "ca.crt", &password, "the ACL user needs the keys under --redis-prefix"),
    ] {
        let (output, took) = consume(user, ca, password);
        let shown = text(&output);
        assert!(!output.status.success(), "{what}: {shown}");
        assert!(shown.contains(says), "{what}: the message does not say {says}: {shown}");
        assert!(took < Duration::from_secs(15), "{what}: took {took:?}");
        assert!(!shown.contains(SECRET) && !shown.contains("wrong-redis-password"), "{what}: shows the password: {shown}");
    }
    let _ = server.kill();
    let _ = server.wait();
}
