// A real @livekit/agents (Node.js) worker for the tests, run unmanaged: `node agent.mjs start`.
// Each session writes `<job id>.started` in MARKER_DIR, then throws, as a broken version does;
// with the job metadata {"end": "ok"} it ends cleanly instead (ctx.shutdown()).
// AGENT_NAME: the agent name it registers with. HEALTH_PORT: its HTTP server's port (0 means
// the default, 8081, which would collide with other workers on a shared test machine).
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ServerOptions, cli, defineAgent } from '@livekit/agents';

export default defineAgent({
  entry: async (ctx) => {
    const end = JSON.parse(ctx.job.metadata || '{}').end;
    const file = join(process.env.MARKER_DIR, `${ctx.job.id}.started`);
    writeFileSync(file, JSON.stringify({ job_id: ctx.job.id, end, pid: process.pid }));
    if (end === 'ok') {
      ctx.shutdown('done');
      return;
    }
    throw new Error('v2 is broken');
  },
});

// Job processes import this file for its default export: only the worker runs the CLI.
if (process.argv[1] === fileURLToPath(import.meta.url)) {
  cli.runApp(
    new ServerOptions({
      agent: fileURLToPath(import.meta.url),
      agentName: process.env.AGENT_NAME,
      port: Number(process.env.HEALTH_PORT),
      numIdleProcesses: 1,
    }),
  );
}
