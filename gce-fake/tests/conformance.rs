//! The fake against the documented API behaviour, over real HTTP: metadata-server header
//! rules, token-gated compute calls, Google's error format, filters, paging and the
//! aggregated list's shape.

use std::time::Duration;

use gce_fake::{GceFake, InstanceSpec};
use serde_json::Value;

struct T {
    fake: GceFake,
    http: reqwest::Client,
}

impl T {
    fn new() -> T {
        T {
            fake: GceFake::start("127.0.0.1:0".parse().unwrap()).unwrap(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    async fn md(&self, path: &str, flavor: bool) -> (u16, String, Option<String>) {
        let mut req = self.http.get(format!(
            "http://{}/computeMetadata/v1/{path}",
            self.fake.metadata_host()
        ));
        if flavor {
            req = req.header("Metadata-Flavor", "Google");
        }
        let resp = req.send().await.unwrap();
        let flavor = resp
            .headers()
            .get("metadata-flavor")
            .map(|v| v.to_str().unwrap().to_owned());
        (resp.status().as_u16(), resp.text().await.unwrap(), flavor)
    }

    async fn token(&self) -> String {
        let (code, body, _) = self
            .md("instance/service-accounts/default/token", true)
            .await;
        assert_eq!(code, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["token_type"], "Bearer");
        assert!(v["expires_in"].as_u64().unwrap() > 0);
        v["access_token"].as_str().unwrap().to_owned()
    }

    async fn compute(&self, path_and_query: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .get(format!("{}{path_and_query}", self.fake.endpoint()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        (
            code,
            serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
        )
    }
}

fn assert_google_error(v: &Value, code: u64) {
    let e = &v["error"];
    assert_eq!(e["code"].as_u64(), Some(code), "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let first = &e["errors"][0];
    assert!(
        first["reason"].is_string() && first["domain"].is_string(),
        "{v}"
    );
}

#[tokio::test]
async fn the_metadata_server_requires_the_flavor_header_and_answers_with_it() {
    let t = T::new();
    let (code, _, _) = t.md("project/project-id", false).await;
    assert_eq!(code, 403);
    let (code, body, flavor) = t.md("project/project-id", true).await;
    assert_eq!((code, body.as_str()), (200, "test-project"));
    assert_eq!(flavor.as_deref(), Some("Google"));
    let (_, zone, _) = t.md("instance/zone", true).await;
    assert_eq!(zone, "projects/123456789012/zones/us-central1-a");
    let (code, _, _) = t.md("instance/attributes/missing", true).await;
    assert_eq!(code, 404);
    let (code, body, _) = t
        .md("instance/service-accounts/default/?recursive=true", true)
        .await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["scopes"][0].as_str().unwrap().contains("cloud-platform"));
}

#[tokio::test]
async fn compute_calls_need_a_token_the_metadata_server_issued() {
    let t = T::new();
    t.fake.add_zone("test-project", "us-central1-a");
    let path = "/compute/v1/projects/test-project/zones/us-central1-a/instances";
    let (code, v) = t.compute(path, None).await;
    assert_eq!(code, 401);
    assert_google_error(&v, 401);
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
    let (code, _) = t.compute(path, Some("ya29.made-up")).await;
    assert_eq!(code, 401);
    let tok = t.token().await;
    let (code, v) = t.compute(path, Some(&tok)).await;
    assert_eq!(code, 200);
    assert_eq!(v["kind"], "compute#instanceList");
    assert!(v.get("items").is_none(), "an empty list has no items field");
}

#[tokio::test]
async fn the_instance_list_has_the_documented_shape_and_pages_by_token() {
    let t = T::new();
    for n in 0..5u8 {
        t.fake.add_instance(
            "test-project",
            "us-central1-a",
            InstanceSpec::running(format!("vm-{n}"))
                .label("cluster", "prod")
                .nic(std::net::IpAddr::from([198, 18, 0, n + 1]))
                .nic(std::net::IpAddr::from([198, 19, 0, n + 1])),
        );
    }
    let tok = t.token().await;
    let base = "/compute/v1/projects/test-project/zones/us-central1-a/instances";
    let (code, v) = t.compute(&format!("{base}?maxResults=2"), Some(&tok)).await;
    assert_eq!(code, 200);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let i = &items[0];
    assert_eq!(i["kind"], "compute#instance");
    assert_eq!(i["status"], "RUNNING");
    assert_eq!(i["labels"]["cluster"], "prod");
    assert!(i["id"].as_str().unwrap().parse::<u64>().is_ok());
    assert!(
        i["zone"]
            .as_str()
            .unwrap()
            .ends_with("/zones/us-central1-a")
    );
    let nic = &i["networkInterfaces"][1];
    assert_eq!(nic["name"], "nic1");
    assert_eq!(nic["networkIP"], "198.19.0.1");
    assert!(
        nic["subnetwork"]
            .as_str()
            .unwrap()
            .contains("/regions/us-central1/")
    );

    let mut names = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10 {
        let q = match &token {
            Some(pt) => format!("{base}?maxResults=2&pageToken={pt}"),
            None => format!("{base}?maxResults=2"),
        };
        let (_, v) = t.compute(&q, Some(&tok)).await;
        for i in v["items"].as_array().unwrap() {
            names.push(i["name"].as_str().unwrap().to_owned());
        }
        token = v["nextPageToken"].as_str().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(names, ["vm-0", "vm-1", "vm-2", "vm-3", "vm-4"]);

    let (code, v) = t
        .compute(&format!("{base}?maxResults=501"), Some(&tok))
        .await;
    assert_eq!(code, 400);
    assert_google_error(&v, 400);
    let (code, _) = t
        .compute(&format!("{base}?pageToken=bogus"), Some(&tok))
        .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn filters_outside_the_supported_subset_are_refused_with_400() {
    let t = T::new();
    t.fake.add_zone("test-project", "us-central1-a");
    let tok = t.token().await;
    let base = "/compute/v1/projects/test-project/zones/us-central1-a/instances";
    let (code, v) = t
        .compute(
            &format!("{base}?filter=%28status%20%3D%20RUNNING%29%20OR%20%28name%20%3D%20x%29"),
            Some(&tok),
        )
        .await;
    assert_eq!(code, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Invalid value for field 'filter'")
    );
}

#[tokio::test]
async fn the_aggregated_list_keys_scopes_by_zone_and_warns_for_empty_and_unreachable_ones() {
    let t = T::new();
    t.fake.add_instance(
        "test-project",
        "us-central1-a",
        InstanceSpec::running("a").nic(std::net::IpAddr::from([198, 18, 0, 1])),
    );
    t.fake.add_zone("test-project", "us-central1-b");
    t.fake.add_zone("test-project", "us-central1-c");
    t.fake.fail_zone("us-central1-c", Some(503));
    let tok = t.token().await;
    let (code, v) = t
        .compute(
            "/compute/v1/projects/test-project/aggregated/instances?returnPartialSuccess=true",
            Some(&tok),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(v["kind"], "compute#instanceAggregatedList");
    assert_eq!(
        v["items"]["zones/us-central1-a"]["instances"][0]["name"],
        "a"
    );
    assert_eq!(
        v["items"]["zones/us-central1-b"]["warning"]["code"],
        "NO_RESULTS_ON_PAGE"
    );
    assert_eq!(
        v["items"]["zones/us-central1-c"]["warning"]["code"],
        "UNREACHABLE"
    );
    assert_eq!(v["unreachables"][0], "zones/us-central1-c");
}

#[tokio::test]
async fn injected_faults_answer_in_googles_format_then_clear() {
    let t = T::new();
    t.fake.add_zone("test-project", "us-central1-a");
    let tok = t.token().await;
    let path = "/compute/v1/projects/test-project/zones/us-central1-a/instances";
    t.fake.fail_next(2, 429);
    let (code, v) = t.compute(path, Some(&tok)).await;
    assert_eq!(code, 429);
    assert_google_error(&v, 429);
    assert_eq!(v["error"]["errors"][0]["reason"], "rateLimitExceeded");
    t.fake.fail_next(1, 500);
    assert_eq!(t.compute(path, Some(&tok)).await.0, 429);
    assert_eq!(t.compute(path, Some(&tok)).await.0, 500);
    assert_eq!(t.compute(path, Some(&tok)).await.0, 200);
    t.fake.deny_list_permission("test-project", true);
    let (code, v) = t.compute(path, Some(&tok)).await;
    assert_eq!(code, 403);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("compute.instances.list")
    );
    let (code, _) = t
        .compute(
            "/compute/v1/projects/other/zones/us-central1-a/instances",
            Some(&tok),
        )
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn nics_carry_internal_ipv6_addresses_with_their_stack_type() {
    let t = T::new();
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    t.fake.add_instance(
        "test-project",
        "us-central1-a",
        InstanceSpec::running("dual")
            .dual_stack_nic(std::net::IpAddr::from([198, 18, 0, 1]), v6("2001:2:0:1::1"))
            .ipv6_only_nic(v6("2001:2:0:2::1"))
            .nic(std::net::IpAddr::from([198, 18, 0, 2])),
    );
    let tok = t.token().await;
    let (code, v) = t
        .compute(
            "/compute/v1/projects/test-project/zones/us-central1-a/instances",
            Some(&tok),
        )
        .await;
    assert_eq!(code, 200);
    let nics = v["items"][0]["networkInterfaces"].as_array().unwrap();
    assert_eq!(nics[0]["stackType"], "IPV4_IPV6");
    assert_eq!(nics[0]["networkIP"], "198.18.0.1");
    assert_eq!(nics[0]["ipv6Address"], "2001:2:0:1::1");
    assert_eq!(nics[0]["ipv6AccessType"], "INTERNAL");
    assert_eq!(nics[0]["internalIpv6PrefixLength"], 96);
    assert_eq!(nics[1]["stackType"], "IPV6_ONLY");
    assert!(nics[1].get("networkIP").is_none(), "{}", nics[1]);
    assert_eq!(nics[1]["ipv6Address"], "2001:2:0:2::1");
    assert_eq!(nics[2]["stackType"], "IPV4_ONLY");
    assert!(nics[2].get("ipv6Address").is_none(), "{}", nics[2]);
}

#[tokio::test]
async fn later_pages_can_be_delayed_while_the_first_is_served_at_once() {
    let t = T::new();
    for n in 0..3u8 {
        t.fake.add_instance(
            "test-project",
            "us-central1-a",
            InstanceSpec::running(format!("vm-{n}")).nic(std::net::IpAddr::from([
                198,
                18,
                0,
                n + 1,
            ])),
        );
    }
    t.fake.delay_later_pages(Duration::from_millis(600));
    let tok = t.token().await;
    let base = "/compute/v1/projects/test-project/zones/us-central1-a/instances?maxResults=2";
    let started = std::time::Instant::now();
    let (_, first) = t.compute(base, Some(&tok)).await;
    let first_took = started.elapsed();
    assert!(first_took < Duration::from_millis(500), "{first_took:?}");
    let pt = first["nextPageToken"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let (code, second) = t
        .compute(&format!("{base}&pageToken={pt}"), Some(&tok))
        .await;
    assert_eq!(code, 200);
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(second["items"][0]["name"], "vm-2");
    let log = t.fake.requests();
    assert_eq!(log.len(), 2);
    assert!(!log[0].query.contains_key("pageToken"));
    assert!(log[1].query.contains_key("pageToken"));
}
