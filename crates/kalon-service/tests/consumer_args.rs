//! The consumer flags, defined once, under two services' environment names.

use clap::Parser;
use kalon_service::{consumer_args, flags_and_env, Membership};

consumer_args! {
    /// As ingest declares it.
    pub struct FirstConsumer {
        env_prefix: "KALON_FIRST_",
        group: "kalon-first",
        health_addr: "127.0.0.1:9181",
    }
}

consumer_args! {
    pub struct SecondConsumer {
        env_prefix: "KALON_SECOND_",
        group: "kalon-second",
        health_addr: "127.0.0.1:9182",
    }
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    consumer: FirstConsumer,
}

#[test]
fn each_service_keeps_its_environment_names() {
    assert_eq!(
        flags_and_env::<FirstConsumer>(),
        [
            "--group KALON_FIRST_GROUP",
            "--membership KALON_FIRST_MEMBERSHIP",
            "--assign-all KALON_FIRST_ASSIGN_ALL",
            "--stall-after-s KALON_FIRST_STALL_AFTER_S",
            "--health-addr KALON_FIRST_HEALTH_ADDR",
        ]
    );
    assert_eq!(
        flags_and_env::<SecondConsumer>()[1],
        "--membership KALON_SECOND_MEMBERSHIP"
    );
    let second: SecondConsumer = kalon_service::defaults();
    assert_eq!(second.group_id, "kalon-second");
    assert_eq!(second.health_addr.port(), 9182);
}

#[test]
fn flags_parse_and_assign_all_is_a_membership() {
    let cli = Cli::try_parse_from([
        "cli",
        "--group",
        "g",
        "--membership",
        "group",
        "--stall-after-s",
        "2",
        "--health-addr",
        "127.0.0.1:0",
    ])
    .unwrap();
    assert_eq!(cli.consumer.group_id, "g");
    assert_eq!(cli.consumer.membership(), Membership::Group);
    assert_eq!(cli.consumer.stall_after().as_secs(), 2);
    cli.consumer.validate().unwrap();

    let cli = Cli::try_parse_from(["cli", "--assign-all"]).unwrap();
    assert_eq!(cli.consumer.membership(), Membership::AssignAll);
    assert!(Cli::try_parse_from(["cli", "--assign-all", "--membership", "group"]).is_err());

    let mut zero: FirstConsumer = kalon_service::defaults();
    zero.stall_after_s = 0;
    assert!(zero.validate().is_err());
}

#[derive(clap::Args, Debug)]
struct Service {
    #[command(flatten)]
    database: kalon_service::DatabaseArgs,
    #[command(flatten)]
    kafka: kalon_service::KafkaArgs,
    #[command(flatten)]
    consumer: SecondConsumer,
}

#[test]
fn defaults_at_a_prefix_prefix_the_group_too() {
    let service: Service = kalon_service::defaults_at("postgres://db/x", "k:1", "t1.");
    assert_eq!(service.database.url.expose(), "postgres://db/x");
    assert_eq!(service.kafka.settings().topic("a"), "t1.a");
    assert_eq!(service.consumer.group_id, "t1.kalon-second");
}
