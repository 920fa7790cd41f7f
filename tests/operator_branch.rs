//! Tier 3: the real operator (`controller::run()`) against the in-process
//! API server, with the real storage engine (copy driver in a temp dir) and
//! real PostgreSQL computes started by the local compute runner.

mod support;

use support::apiserver::ApiServer;
use support::branch_scenario::{self, Harness, WriteCounter, NS};

struct ServerWrites(ApiServer);

#[async_trait::async_trait]
impl WriteCounter for ServerWrites {
    async fn reset(&self) {
        self.0.reset_counts();
    }
    async fn count(&self) -> usize {
        self.0.write_count()
    }
    async fn describe(&self) -> String {
        format!("{:#?}", self.0.writes())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn branch_lifecycle_on_real_postgres() {
    let server = ApiServer::new();
    use kube::CustomResourceExt;
    server.install_crd(&pgbranch::api::Branch::crd());
    server.create_namespace(NS);
    let h = Harness::start(server.client()).await;
    branch_scenario::run(&h, &ServerWrites(server.clone())).await;
    h.shutdown().await;
}
