// The Node.js agent of the cold-start benchmark (benchmarks/coldstart/run.py --lang node), in
// place of examples/node_agent's agent.js (same package.json and lockfile): each session ends by
// itself after its metadata's {"seconds": N}, as examples/voice_agent's synthetic sessions do, so
// that an agent scaled to zero goes back to zero between rounds. HEALTH_PORT moves the worker's
// HTTP server off 8081, so that a bare `node agent.js start` runs beside others on one machine.
import { fileURLToPath } from 'node:url';
import { ServerOptions, cli, defineAgent } from '@livekit/agents';

export default defineAgent({
  entry: async (ctx) => {
    const seconds = Number(JSON.parse(ctx.job.metadata || '{}').seconds ?? 0);
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
    ctx.shutdown('done');
  },
});

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const port = Number(process.env.HEALTH_PORT || 0);
  cli.runApp(new ServerOptions({ agent: fileURLToPath(import.meta.url), ...(port ? { port } : {}) }));
}
